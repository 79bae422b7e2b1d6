"""Abstract module groups used by composites to choose a rule per module type.

Each group is a tuple of ``torch.nn`` classes, so ``isinstance(module, group)`` works directly,
and groups can be combined with ``+``. Groups include the matching kinds of captured functional
calls (:mod:`lrpkit.captured`), so a rule mapped to ``types.Activation`` also reaches ``F.relu``.

Examples
--------
>>> import torch
>>> from lrpkit import types
>>> isinstance(torch.nn.Conv2d(1, 1, 3), types.Convolution)
True
>>> isinstance(torch.nn.Linear(2, 2), types.AnyLinear)
True
"""

from __future__ import annotations

from torch import nn

from . import captured

#: Standard (forward) convolutions, and captured ``F.conv1d``/``2d``/``3d`` calls with constant weights.
ConvolutionStandard: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, captured.Convolution)
#: Transposed convolutions, and captured ``F.conv_transpose*`` calls with constant weights.
ConvolutionTranspose: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    captured.ConvolutionTranspose,
)
#: All convolutions, standard and transposed.
Convolution: tuple[type[nn.Module], ...] = ConvolutionStandard + ConvolutionTranspose
#: Dense layers (``nn.Linear`` and its subclasses such as ``LazyLinear`` once materialised), and
#: captured ``F.linear`` calls with constant weights (Swin's attention, for one).
Linear: tuple[type[nn.Module], ...] = (nn.Linear, captured.Dense)
#: Every layer of the form ``z = W a + b``: dense layers and convolutions.
AnyLinear: tuple[type[nn.Module], ...] = Linear + Convolution
#: Batch normalisation layers.
BatchNorm: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: Average (sum-like) pooling layers, and captured sums and means.
AvgPool: tuple[type[nn.Module], ...] = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    captured.Pool,
)
#: Captured resampling calls (``F.interpolate``, also the one ``nn.Upsample`` makes): linear maps without
#: parameters, split proportionally like average pooling.
Resample: tuple[type[nn.Module], ...] = (captured.Resample,)
#: Max pooling layers and captured maxima (explained by their gradient: relevance goes to the winner).
MaxPool: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    captured.MaxPool,
)
#: Element-wise activation modules, and captured activation calls (``F.relu``, ``torch.tanh``, ...).
Activation: tuple[type[nn.Module], ...] = (
    nn.CELU,
    nn.ELU,
    nn.GELU,
    nn.Hardshrink,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.LogSigmoid,
    nn.Mish,
    nn.PReLU,
    nn.ReLU,
    nn.ReLU6,
    nn.RReLU,
    nn.SELU,
    nn.Sigmoid,
    nn.SiLU,
    nn.Softplus,
    nn.Softshrink,
    nn.Softsign,
    nn.Tanh,
    nn.Tanhshrink,
    nn.Threshold,
    captured.Activation,
)
#: Additions of tensors: captured ``x + y``, ``x - y`` and ``torch.add`` calls.
Sum: tuple[type[nn.Module], ...] = (captured.Add,)

__all__ = [
    "Activation",
    "AnyLinear",
    "AvgPool",
    "BatchNorm",
    "Convolution",
    "ConvolutionStandard",
    "ConvolutionTranspose",
    "Linear",
    "MaxPool",
    "Resample",
    "Sum",
]
