"""Functional calls captured during a forward pass, presented to composites as modules.

:class:`lrpkit.canonizers.FunctionalCapture` sees every functional call a model makes outside
the modules that carry a rule (``x + y``, ``torch.relu``, ``torch.flatten``, ``torch.cat``,
``F.layer_norm``, ``F.scaled_dot_product_attention``, ...). Each call site gets a stable name
and one object of the classes below, chosen by the operation's *kind*. The classes are
``nn.Module`` subclasses, so composites match them exactly like modules: by name (exact, glob
or callable, see :class:`lrpkit.composites.NameMapComposite`) or by type (these classes, or the
groups in :mod:`lrpkit.types` that include them). The objects are never added to the model.

Names are ``<enclosing module path>.<op>`` with ``_1``, ``_2``, ... for the second, third, ...
call of the same op in the same module during one forward pass, e.g. ``layer1.0.add`` (the
residual addition of a torchvision ResNet block) or ``relu_2`` (the third functional ReLU
called by the root module). They are the same on every forward pass of the same code path.

Examples
--------
>>> from lrpkit import captured
>>> captured.kind_of("add"), captured.kind_of("flatten"), captured.kind_of("gelu")
(<class 'lrpkit.captured.Add'>, <class 'lrpkit.captured.Reshape'>, <class 'lrpkit.captured.Activation'>)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


class CapturedOp(nn.Module):
    """One captured call site: its stable ``name``, the ``op`` it calls and the function.

    Parameters
    ----------
    name
        The stable name, e.g. ``"layer1.0.add"``.
    op
        The normalised operation name, e.g. ``"add"`` for ``x + y``, ``x += y`` and ``torch.add``.
    func
        The function that was called (for re-running it in a rule's backward).
    """

    def __init__(self, name: str, op: str, func: Callable[..., Any]) -> None:
        super().__init__()
        self.name = name
        self.op = op
        self.func = func

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the captured function again."""
        return self.func(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, op={self.op!r}"


class Add(CapturedOp):
    """Additions and subtractions of tensors (``x + y``, ``x - y``, ``torch.add``): default ``Norm``.

    Also ``index_add`` and ``scatter_add``, sums of scattered rows (a mixture of experts adding its
    experts' outputs back, as Mixtral does with ``index_add_``; a graph network summing its
    messages), and ``scatter_reduce(..., reduce="sum")`` and ``index_put(..., accumulate=True)``.
    (``scatter_reduce`` and ``index_reduce`` with ``"mean"`` are :class:`Pool` calls, with
    ``"amax"``/``"amin"`` :class:`MaxPool` ones.)

    Also ``torch.addcmul(input, t1, t2)`` (``input + t1 * t2``, ResMLP's ``Affine``, ConvNeXt-V2's
    global response norm) when at most one of ``t1``, ``t2`` carries relevance; with both it is
    an :class:`Other` call.
    """


class Pool(CapturedOp):
    """Sums and averages (``sum``, ``mean``, ``cumsum``, ``avg_pool*``, ``adaptive_avg_pool*``, ``fold``): default ``Norm``.

    ``F.fold`` adds overlapping patches up, so it splits like a sum; ``cumsum`` is a sum per
    position (as a gradient, each input would get the relevance of every later position).
    """


class Resample(CapturedOp):
    """Resampling with ``F.interpolate`` (``nn.Upsample`` calls it), in any mode, and
    ``F.grid_sample``: default ``Norm``.

    Each output is a fixed weighted sum of inputs (one of them for ``nearest``, a convex
    combination for ``bilinear``, ``area``, ...), so the call is a linear map without parameters.
    ``grid_sample``'s grid says where to sample; computed by the model (a spatial transformer's
    ``affine_grid`` of a learned ``theta``, an optical flow) it is held constant like attention
    weights, and all relevance goes to the sampled input. So are the boxes of torchvision's
    ``roi_align`` and ``ps_roi_align`` (a detector's pooling of each region proposal).
    ``Norm`` gives each input its share of every output it contributes to, and nothing to an input
    that is zero. The gradient, which the call would get as an unknown op, spreads an output's
    relevance over its inputs by the weights alone: onto zero inputs too, from where the rule of
    the layer before (proportional to its output) cannot pass it on, so it is lost (9 % of the
    relevance of torchvision's LRASPP segmentation head).
    """


#: ``Resample`` calls that sample their first argument where another argument says: the grid of
#: ``F.grid_sample``, the boxes of torchvision's ``roi_align`` (held constant); outside the input
#: they read zeros.
SAMPLERS = frozenset({"grid_sample", "roi_align", "ps_roi_align"})
#: Layer calls with arguments held constant, by leaf: ``deform_conv2d(input, weight, offset, mask, bias, ...)``.
CONSTANT_ARGUMENTS: dict[str, tuple[int, ...]] = {"deform_conv2d": (2, 3)}


class MaxPool(CapturedOp):
    """Maxima (``max_pool*``, ``adaptive_max_pool*``, ``amax``, ``max``): the gradient (winner takes all)."""


class Activation(CapturedOp):
    """Element-wise functions of one tensor (``relu``, ``gelu``, ``silu``, ``sigmoid``, ``x ** 2``, ``-x``, ...): default ``Pass``.

    ``pow`` is one only with a constant exponent (``x ** 2``, StarReLU's squared ReLU); ``x ** y``
    of two activations is an :class:`Other` call. So is ``clamp`` (``clip``, ``clamp_min``,
    ``clamp_max``) only with constant bounds: ``x.clamp(0, 6)`` is a ReLU6, ``x.clamp(min=0)`` a
    ReLU, and passes relevance as those modules do; as a gradient it would drop the relevance of
    the clipped values.
    """


class ReLU(Activation):
    """``relu`` (``F.relu``, ``torch.relu``, ``x.relu()``): an activation, and what the gradient presets rectify."""


class Reshape(CapturedOp):
    """Calls that move or copy values (reshape, permute, cat, split, pad, indexing, dropout): the gradient."""


class Product(CapturedOp):
    """Products and divisions (``x * y``, ``matmul``, ``bmm``, ``einsum``, ``torch.sparse.mm``, ``x / y``): default ``Product``.

    A factor that is a gate (the output of a sigmoid, hard sigmoid, softmax or ``exp``, or of a
    captured call on such outputs and constants alone: a softmax written out, ``exp(s - max(s)) /
    sum(...)``), a parameter (or a tensor computed from parameters
    alone), or a divisor is treated as a constant and receives no relevance. A ``tanh`` output is
    a weaker gate: it gates a signal (``x * (1 + tanh(z)) / 2``, a tanh-approximated GELU) but is
    the signal next to a sigmoid (an LSTM's ``o * tanh(c)``); see :data:`GATE_OPS`.
    """


class LayerNorm(CapturedOp):
    """``layer_norm`` and ``rms_norm``: default ``LayerNormConstant`` (the standard deviation held constant)."""


class GroupNorm(CapturedOp):
    """``group_norm`` and ``instance_norm``: default ``LayerNormConstant`` (the standard deviation held constant)."""


class Normalize(CapturedOp):
    """``F.normalize`` (``x / max(||x||_p, eps)``, cosine classifiers, CLIP-style embeddings): default ``Pass``.

    The norm is held constant, as :class:`LayerNorm`'s rule holds the standard deviation
    (CP-LRP): the call is then a scale of each element, and each element keeps its relevance. Its
    gradient, which it would get as an unknown op, is orthogonal to ``x`` (the result does not
    change with ``x``'s length) and gives relevance that no longer sums to the output's.
    """


class Softmax(CapturedOp):
    """``softmax`` and ``log_softmax``: the gradient (in attention, softmax outputs are gates)."""


class Attention(CapturedOp):
    """``scaled_dot_product_attention`` and ``multi_head_attention_forward``: default ``AttentionValue``."""


class Dense(CapturedOp):
    """``F.linear`` (or ``torch.addmm(bias, x, weight)``, GPT-2's ``Conv1D``) whose weight and bias are constants of the model.

    Also a mixture of experts' ``torch._grouped_mm(x, W, offs=offs)`` (``F.grouped_mm``): a
    dense layer per expert on the rows routed to it. Matched by :data:`lrpkit.types.Linear`, so a
    composite's dense-layer rule reaches it (default ``Epsilon``); the weight and bias are the
    layer's parameters for the rule. With a weight computed from the input it is an
    :class:`Other` call.
    """


class Convolution(CapturedOp):
    """``F.conv1d``/``conv2d``/``conv3d`` whose weight and bias are constants of the model.

    Matched by :data:`lrpkit.types.ConvolutionStandard` (default ``Epsilon``), as :class:`Dense`.
    Also torchvision's deformable convolution (``torchvision.ops.deform_conv2d``, the call of
    ``DeformConv2d``; Dai et al. 2017, Zhu et al. 2019): its offsets and modulation mask, where to
    sample and how much, are held constant, as :data:`SAMPLERS` hold their grids, so it is a
    linear map of its input and all relevance goes to the sampled input.
    """


class ConvolutionTranspose(CapturedOp):
    """``F.conv_transpose1d``/``2d``/``3d`` whose weight and bias are constants of the model.

    Matched by :data:`lrpkit.types.ConvolutionTranspose` (default ``Epsilon``), as :class:`Dense`.
    """


class Fourier(CapturedOp):
    """Fourier transforms of one real activation up to the real tensor they give back: default ``Norm``.

    ``torch.fft.fftn(x).real`` (FNet's token mixing), ``irfft2(rfft2(x) * w)`` with a constant
    spectral filter ``w`` (GFNet), and the linear steps between them (slicing, reshapes, products
    with constants) are one linear map of ``x``, captured as one call named after its last step
    (``real``, ``fft_irfft2``). ``Norm`` gives each element of ``x`` its share of every output
    it contributes to. Their gradient, which the complex steps would otherwise keep, is no
    relevance at all: FNet's relevance summed to hundreds of times its logit.
    """


class Other(CapturedOp):
    """Any other call on activations (``exp``, ``pow``, ``F.linear`` with a weight computed from the input, ...): the gradient."""


_KINDS: dict[type[CapturedOp], tuple[str, ...]] = {
    Add: ("add", "sub", "rsub", "addcmul", "index_add", "scatter_add"),
    Pool: (
        "sum",
        "mean",
        "cumsum",
        "fold",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
    ),
    Resample: ("interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample", "roi_align", "ps_roi_align"),
    MaxPool: (
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool1d_with_indices",
        "max_pool2d_with_indices",
        "max_pool3d_with_indices",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "adaptive_max_pool3d",
        "amax",
        "max",
    ),
    ReLU: ("relu",),
    Activation: (
        "relu6",
        "leaky_relu",
        "gelu",
        "silu",
        "hardswish",
        "hardsigmoid",
        "hardtanh",
        "elu",
        "selu",
        "celu",
        "mish",
        "softplus",
        "tanh",
        "erf",
        "sigmoid",
        "logsigmoid",
        "softsign",
        "threshold",
        "clamp",
        "clip",
        "clamp_min",
        "clamp_max",
        "prelu",
        "pow",
        "rpow",
        "square",
        "sqrt",
        "exp",
        "abs",
        "neg",
    ),
    Reshape: (
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "flatten",
        "unflatten",
        "permute",
        "transpose",
        "swapaxes",
        "movedim",
        "t",
        "T",
        "mT",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "repeat",
        "cat",
        "concat",
        "concatenate",
        "stack",
        "split",
        "chunk",
        "unbind",
        "tensor_split",
        "narrow",
        "select",
        "getitem",
        "pad",
        "flip",
        "roll",
        "clone",
        "to",
        "float",
        "double",
        "half",
        "bfloat16",
        "type",
        "type_as",
        "dropout",
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha_dropout",
        "feature_alpha_dropout",
        "channel_shuffle",
        "pixel_shuffle",
        "pixel_unshuffle",
    ),
    Product: ("mul", "matmul", "bmm", "mm", "_sparse_mm", "einsum", "div"),
    LayerNorm: ("layer_norm", "rms_norm"),
    GroupNorm: ("group_norm", "instance_norm"),
    Normalize: ("normalize",),
    Softmax: ("softmax", "log_softmax"),
    Attention: ("scaled_dot_product_attention", "multi_head_attention_forward"),
    Dense: ("linear", "addmm", "_grouped_mm", "grouped_mm"),
    Convolution: ("conv1d", "conv2d", "conv3d", "deform_conv2d"),
    ConvolutionTranspose: ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
}

_KIND_OF: dict[str, type[CapturedOp]] = {op: kind for kind, ops in _KINDS.items() for op in ops}


def kind_of(op: str) -> type[CapturedOp]:
    """The class for the normalised operation name ``op`` (:class:`Other` when unknown)."""
    return _KIND_OF.get(op, Other)


#: Ops that are layers when their weight and bias are constants (:class:`Dense`, :class:`Convolution`, ...).
LAYER_OPS = frozenset(_KINDS[Dense] + _KINDS[Convolution] + _KINDS[ConvolutionTranspose])

#: Ops whose output gates another tensor when it is one factor of a product, and how strongly:
#: a product gives its relevance to the factors of the lowest level (a signal is 0), so a tanh
#: output gates a signal but is the signal next to a sigmoid (an LSTM's ``o * tanh(c)``).
GATE_OPS: dict[str, int] = {"sigmoid": 2, "hardsigmoid": 2, "softmax": 2, "exp": 2, "tanh": 1, "erf": 1}


__all__ = [
    "Activation",
    "Add",
    "Attention",
    "CapturedOp",
    "CONSTANT_ARGUMENTS",
    "Convolution",
    "ConvolutionTranspose",
    "Dense",
    "GATE_OPS",
    "GroupNorm",
    "LAYER_OPS",
    "LayerNorm",
    "MaxPool",
    "Other",
    "Pool",
    "Product",
    "ReLU",
    "Reshape",
    "SAMPLERS",
    "Softmax",
    "kind_of",
]
