"""PatternNet and PatternAttribution: signal patterns learnt from data, used as backward weights.

A linear layer's filter ``w`` (its weight row for one output unit) is not the direction of the
signal it detects: it must also cancel the distractors in its input, so it points away from
them. Kindermans et al. estimate the *pattern* ``a`` instead, the direction in input space along
which the unit's output ``y = w^T x`` varies, from the statistics of the data (Kindermans et
al., "Learning how to explain neural networks: PatternNet and PatternAttribution", ICLR 2018):

* the **linear** estimator ``S_a``: ``a = cov(x, y) / (w^T cov(x, y))`` over all samples;
* the **positive** estimator ``S_a+-``, of which a layer followed by a ReLU needs only the
  positive half: ``a+ = cov+(x, y) / (w^T cov+(x, y))``, the covariance taken over the samples
  where the unit is active (its output, bias included, is ``> 0``).

For a convolution, ``x`` is an input patch (zero padding included) and the statistics run over
samples *and* output positions, per output channel. ``w^T a = 1`` for every unit with a pattern.

With the patterns fitted (:func:`fit`), two explanations reuse the gradient's backward pass:

* :class:`PatternNet` projects the signal back: the weights are replaced by the patterns,
  ``r_in = A^T r_out``;
* :class:`PatternAttribution` attributes to the input: the weights are replaced by
  ``W * A`` (element-wise), ``r_in = (W * A)^T r_out``, with no multiplication by the input.

Between the layers the signal flows like a gradient: through a ReLU it is gated by the forward
pass's switches, through max pooling it goes to the winner. :func:`composite` therefore attaches
rules to the fitted layers only and uses no canonizers (see there why).

Cost of :func:`fit`: one forward pass over the data (no backward), plus per fitted layer and per
sample (per sample and output position for a convolution) the outer-product accumulation
``y x^T`` of size ``fan_out x fan_in``: ``2 * fan_in * fan_out`` FLOPs, as much again as the
layer's own forward, done in float64. The positive estimator accumulates two such products
(``y+ x^T`` and ``[y > 0] x^T``), twice that. Memory: two (linear) or three (positive) float64
tensors shaped like each fitted weight.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from lrpkit import patterns
>>> from lrpkit.attribution import Gradient
>>> _ = torch.manual_seed(0)
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
>>> data = [torch.randn(32, 4) for _ in range(4)]
>>> fitted = patterns.fit(model, data, estimator={"0": "positive", "2": "linear"})  # linear: logits
>>> fitted
Patterns(0: (8, 4) positive, 2: (3, 8) linear)
>>> output, relevance = Gradient(model, patterns.composite(fitted))(data[0][:2])
>>> relevance.shape
torch.Size([2, 4])
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from .canonizers import Canonizer
from .composites.maps import Ctx, NameMapComposite
from .core import LayerCall, Rule

Estimator = Literal["linear", "positive"]
Kind = Literal["attribution", "net"]
EstimatorChoice = Union[Estimator, Mapping[str, Estimator]]
Progress = Callable[[int, int], None]

ESTIMATORS: tuple[str, ...] = ("linear", "positive")
KINDS: tuple[str, ...] = ("attribution", "net")
_FORMAT = "lrpkit.patterns"
_FORMAT_VERSION = 1


# -- the rules ---------------------------------------------------------------------------------


class _PatternRule(Rule):
    """A rule whose backward is the layer's transposed product under weights built from a pattern."""

    def __init__(self, pattern: Tensor) -> None:
        if not isinstance(pattern, Tensor) or not pattern.is_floating_point():
            raise TypeError(f"{type(self).__name__} needs a floating-point pattern tensor, got {pattern!r}")
        self.pattern = pattern.detach()
        self._cached: Tensor = self.pattern

    def backward_weight(self, weight: Tensor, pattern: Tensor) -> Tensor:
        """The weight that replaces the layer's weight in the backward pass."""
        raise NotImplementedError

    def relevance(self, call: LayerCall, relevance: Tensor) -> tuple[Tensor | None, ...]:
        params = call.params()
        weight = params.get("weight")
        if weight is None:
            raise TypeError(
                f"{type(self).__name__} needs a layer with a 'weight' parameter (nn.Linear or a "
                f"convolution); module {call.describe()} has none"
            )
        pattern = self._pattern_like(weight, call)
        params["weight"] = self.backward_weight(weight, pattern)
        return call.ops.transpose(call.inputs, params, relevance)

    def _pattern_like(self, weight: Tensor, call: LayerCall) -> Tensor:
        if self.pattern.shape != weight.shape:
            raise ValueError(
                f"the pattern of module {call.describe()} has shape {tuple(self.pattern.shape)} but "
                f"its weight has shape {tuple(weight.shape)}; were the patterns fitted on another model?"
            )
        if self._cached.device != weight.device or self._cached.dtype != weight.dtype:
            self._cached = self.pattern.to(device=weight.device, dtype=weight.dtype)
        return self._cached

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pattern of shape {tuple(self.pattern.shape)})"


class PatternAttribution(_PatternRule):
    """PatternAttribution (Kindermans et al. 2018): backward through ``W * A`` (element-wise).

    ``r_in = (W * A)^T r_out``: the relevance at the layer's output goes back through the weights
    multiplied element-wise by the signal pattern ``A`` (shaped like ``W``); unlike LRP rules,
    the result is not multiplied by the input. Through ReLUs and pooling the relevance flows as
    a gradient (use :func:`composite`, which leaves those modules alone).

    Parameters
    ----------
    pattern
        The layer's pattern, shaped like its weight (see :func:`fit`); cast to the weight's
        device and dtype when used.

    Raises
    ------
    ValueError
        In the backward pass, if the pattern's shape is not the layer's weight shape (the message
        names the layer).

    Examples
    --------
    >>> import torch
    >>> from lrpkit.composites import LayerMapComposite
    >>> from lrpkit.attribution import Gradient
    >>> layer = torch.nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
    >>> rule = PatternAttribution(torch.tensor([[1.0, 0.0]]))
    >>> composite = LayerMapComposite([(torch.nn.Linear, rule)], canonizers=[])
    >>> Gradient(layer, composite)(torch.tensor([[3.0, 1.0]]), target=0).relevance
    tensor([[2., 0.]])
    """

    def backward_weight(self, weight: Tensor, pattern: Tensor) -> Tensor:
        return weight * pattern


class PatternNet(_PatternRule):
    """PatternNet (Kindermans et al. 2018): the signal projected back through the patterns.

    ``r_in = A^T r_out``: the backward pass uses the pattern ``A`` (shaped like ``W``) in place
    of the weight, so what arrives at the input is the signal the explained output detected,
    in input space. Through ReLUs and pooling it flows as a gradient (use :func:`composite`).

    Parameters
    ----------
    pattern
        The layer's pattern, shaped like its weight (see :func:`fit`).

    Raises
    ------
    ValueError
        In the backward pass, if the pattern's shape is not the layer's weight shape.

    Examples
    --------
    >>> import torch
    >>> from lrpkit.composites import LayerMapComposite
    >>> from lrpkit.attribution import Gradient
    >>> layer = torch.nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
    >>> composite = LayerMapComposite([(torch.nn.Linear, PatternNet(torch.tensor([[1.0, 0.0]])))], canonizers=[])
    >>> Gradient(layer, composite)(torch.tensor([[3.0, 1.0]]), target=0).relevance
    tensor([[2., 0.]])
    """

    def backward_weight(self, weight: Tensor, pattern: Tensor) -> Tensor:
        return pattern


_RULES: dict[str, type[_PatternRule]] = {"attribution": PatternAttribution, "net": PatternNet}


# -- fitted patterns ---------------------------------------------------------------------------


class Patterns(Mapping[str, Tensor]):
    """Fitted signal patterns by layer name, each shaped like that layer's weight.

    A read-only mapping ``name -> pattern`` (float64, on the CPU) that also remembers which
    estimator produced each pattern. Build it with :func:`fit`, store it with :meth:`save`,
    read it back with :meth:`load`, explain with :meth:`composite`.

    Parameters
    ----------
    patterns
        ``{layer name: pattern}``.
    estimators
        The estimator of every layer, or one for all of them.

    Examples
    --------
    >>> import torch
    >>> fitted = Patterns({"fc": torch.ones(2, 3)}, estimators="linear")
    >>> fitted
    Patterns(fc: (2, 3) linear)
    >>> list(fitted), fitted.estimators
    (['fc'], {'fc': 'linear'})
    """

    def __init__(self, patterns: Mapping[str, Tensor], estimators: EstimatorChoice = "linear") -> None:
        self._patterns = {name: _as_pattern(name, value) for name, value in patterns.items()}
        if isinstance(estimators, str):
            estimators = {name: estimators for name in self._patterns}
        self.estimators: dict[str, str] = {name: _checked_estimator(estimators.get(name), name) for name in self._patterns}

    def __getitem__(self, name: str) -> Tensor:
        return self._patterns[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._patterns)

    def __len__(self) -> int:
        return len(self._patterns)

    def __repr__(self) -> str:
        entries = ", ".join(
            f"{name}: {tuple(value.shape)} {self.estimators[name]}" for name, value in self._patterns.items()
        )
        return f"Patterns({entries})"

    def rules(self, kind: Kind = "attribution") -> dict[str, Rule]:
        """One :class:`PatternAttribution` (``kind="attribution"``) or :class:`PatternNet` (``"net"``) per layer."""
        rule = _RULES.get(kind)
        if rule is None:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return {name: rule(pattern) for name, pattern in self._patterns.items()}

    def composite(self, kind: Kind = "attribution", canonizers: Sequence[Canonizer] = ()) -> PatternComposite:
        """The composite that explains with these patterns; see :func:`composite`."""
        return PatternComposite(self, kind=kind, canonizers=canonizers)

    def check(self, model: nn.Module) -> None:
        """Make sure every pattern names a layer of ``model`` whose weight has the pattern's shape.

        Raises
        ------
        ValueError
            Naming the first layer that is missing, has no weight, or has a weight of another shape.
        """
        modules = dict(model.named_modules())
        for name, pattern in self._patterns.items():
            module = modules.get(name)
            if module is None:
                raise ValueError(
                    f"the patterns hold layer '{name}', which {type(model).__name__} does not have; "
                    "were they fitted on another model?"
                )
            weight = getattr(module, "weight", None)
            if not isinstance(weight, Tensor):
                raise ValueError(f"layer '{name}' ({type(module).__name__}) has no weight for its pattern")
            if weight.shape != pattern.shape:
                raise ValueError(
                    f"the pattern of layer '{name}' ({type(module).__name__}) has shape "
                    f"{tuple(pattern.shape)} but its weight has shape {tuple(weight.shape)}; were the "
                    "patterns fitted on another model?"
                )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the patterns to ``path`` (a ``torch.save`` file of plain tensors and strings)."""
        torch.save(
            {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "estimators": dict(self.estimators),
                "patterns": dict(self._patterns),
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Patterns:
        """Read patterns written by :meth:`save` (with ``weights_only=True``: no code is run).

        Raises
        ------
        ValueError
            If the file does not hold lrpkit patterns.
        """
        content = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(content, dict) or content.get("format") != _FORMAT:
            raise ValueError(f"{os.fspath(path)!r} does not hold lrpkit patterns (written by Patterns.save)")
        if content.get("version") != _FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(path)!r} holds patterns of format version {content.get('version')}; "
                f"this lrpkit reads version {_FORMAT_VERSION}"
            )
        return cls(content["patterns"], content["estimators"])


def _as_pattern(name: str, value: Tensor) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"the pattern of layer '{name}' must be a floating-point tensor, got {type(value).__name__}")
    return value.detach().to(device="cpu", dtype=torch.float64)


def _checked_estimator(estimator: object, name: str | None = None) -> str:
    if estimator not in ESTIMATORS:
        where = f" for layer '{name}'" if name is not None else ""
        raise ValueError(f"estimator{where} must be one of {ESTIMATORS}, got {estimator!r}")
    return str(estimator)


class PatternComposite(NameMapComposite):
    """Pattern rules on the fitted layers, the plain gradient everywhere else.

    Built by :func:`composite`. Before the rules are attached, the patterns are checked against
    the model (:meth:`Patterns.check`). Modules without a pattern (ReLUs, pooling, BatchNorm,
    layers not fitted) carry the plain gradient, which is the method's definition, so no warning
    is given for them.
    """

    warn_uncovered = False

    def __init__(self, patterns: Patterns, kind: Kind = "attribution", canonizers: Sequence[Canonizer] = ()) -> None:
        rules = patterns.rules(kind)
        super().__init__([(name, rule) for name, rule in rules.items()], canonizers=list(canonizers))
        self.patterns = patterns
        self.kind = kind
        self._rules = rules

    def module_map(self, ctx: Ctx, name: str, module: nn.Module) -> Rule | None:
        return self._rules.get(name)

    def register(self, model: nn.Module) -> None:
        self.patterns.check(model)
        super().register(model)

    def __repr__(self) -> str:
        return f"PatternComposite(kind={self.kind!r}, layers={list(self._rules)})"


def composite(
    patterns: Patterns, kind: Kind = "attribution", canonizers: Sequence[Canonizer] = ()
) -> PatternComposite:
    """The composite that explains a model with PatternAttribution or PatternNet.

    Every fitted layer gets :class:`PatternAttribution` (``kind="attribution"``) or
    :class:`PatternNet` (``kind="net"``); every other module, activations included, gets no rule,
    so relevance passes it as a gradient: a ReLU gates it with the forward pass's switches, as
    in the paper (Kindermans et al. 2018).

    Parameters
    ----------
    patterns
        Fitted patterns (:func:`fit` or :meth:`Patterns.load`).
    kind
        ``"attribution"`` or ``"net"``.
    canonizers
        None by default, on purpose: the default canonizers would give functional activations
        (``F.relu``) the ``Pass`` rule, which removes the ReLU gating, and would merge BatchNorm
        into the layers whose patterns were fitted without it. Give canonizers only if they keep
        the gradient through everything but the fitted layers.

    Returns
    -------
    PatternComposite
        A :class:`~lrpkit.composites.NameMapComposite` over the fitted layer names.

    Raises
    ------
    ValueError
        If ``kind`` is unknown; when the composite is registered, if a pattern does not fit the
        model (:meth:`Patterns.check`).

    Examples
    --------
    >>> import torch
    >>> from lrpkit.attribution import Gradient
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    >>> fitted = fit(model, [torch.randn(16, 3)])
    >>> signal = Gradient(model, composite(fitted, kind="net"))(torch.randn(1, 3), target=0)
    >>> signal.relevance.shape
    torch.Size([1, 3])
    """
    return PatternComposite(patterns, kind=kind, canonizers=canonizers)


# -- statistics --------------------------------------------------------------------------------


class _Layout:
    """How a layer's input patches and outputs line up: dense rows or convolution windows.

    Tensors stay in the layer's own layout: ``(..., units)`` for a dense layer,
    ``(batch, units, *positions)`` (or unbatched ``(units, *positions)``) for a convolution.
    """

    unit_dim: int = -1

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def batched(self, tensor: Tensor) -> Tensor:
        """``tensor`` with a batch dimension (convolutions accept unbatched inputs)."""
        return tensor

    def unit_sums(self, tensor: Tensor) -> Tensor:
        """Sum over everything but the unit dimension: shape ``(units,)``."""
        return tensor.movedim(self.unit_dim, 0).reshape(tensor.shape[self.unit_dim], -1).sum(1)

    def without_bias(self, output: Tensor) -> Tensor:
        """``y = w^T x``: the output less the bias."""
        layer: Any = self.module
        if layer.bias is None:
            return output
        bias = layer.bias.detach().to(output)
        return output - bias.view(-1, *([1] * (output.ndim - 2))) if self.unit_dim == 1 else output - bias

    def patch_products(self, x: Tensor, grad: Tensor) -> Tensor:
        """``sum over samples/positions of grad[unit] * patch``, shaped like the weight."""
        raise NotImplementedError

    def patch_sums(self, x: Tensor, output: Tensor) -> Tensor:
        """``sum over samples/positions of patch``, for every unit (shaped like the weight)."""
        raise NotImplementedError


class _DenseLayout(_Layout):
    """``nn.Linear``: a sample is one row of the input (leading dimensions flattened)."""

    def patch_products(self, x: Tensor, grad: Tensor) -> Tensor:
        return grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    def patch_sums(self, x: Tensor, output: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1]).sum(0).expand(output.shape[-1], -1)


class _ConvLayout(_Layout):
    """``nn.Conv{1,2,3}d``: a sample is one input window (zero padding included) per position.

    The sums over windows are weight gradients: ``aten.convolution_backward`` with only the
    weight gradient requested, so no window is ever unfolded into memory.
    """

    unit_dim = 1

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        conv: Any = module
        self.dims = len(conv.kernel_size)
        self.groups = int(conv.groups)

    def batched(self, tensor: Tensor) -> Tensor:
        return tensor if tensor.ndim == self.dims + 2 else tensor.unsqueeze(0)

    def _weight_gradient(self, x: Tensor, grad: Tensor, weight_shape: Sequence[int], groups: int) -> Tensor:
        conv: Any = self.module
        return torch.ops.aten.convolution_backward(
            grad,
            x,
            x.new_zeros(weight_shape),
            None,
            list(conv.stride),
            list(conv.padding),
            list(conv.dilation),
            False,
            [0] * self.dims,
            groups,
            [False, True, False],
        )[1]

    def patch_products(self, x: Tensor, grad: Tensor) -> Tensor:
        conv: Any = self.module
        return self._weight_gradient(x, grad, conv.weight.shape, self.groups)

    def patch_sums(self, x: Tensor, output: Tensor) -> Tensor:
        conv: Any = self.module
        ones = output.new_ones(output.shape[0], 1, *output.shape[2:])
        channels = x.shape[1]
        sums = self._weight_gradient(x, ones, (1, channels, *conv.kernel_size), 1)
        per_group = sums.reshape(self.groups, channels // self.groups, *conv.kernel_size)
        return per_group.repeat_interleave(conv.out_channels // self.groups, dim=0)


def _layout(module: nn.Module) -> _Layout:
    if isinstance(module, nn.Linear):
        return _DenseLayout(module)
    return _ConvLayout(module)


def fittable(module: nn.Module) -> bool:
    """Whether :func:`fit` can estimate a pattern for ``module``.

    ``nn.Linear`` and standard convolutions (``nn.Conv1d/2d/3d``) with numeric zero padding:
    the layers with a closed-form backward in :mod:`lrpkit.ops`.

    Examples
    --------
    >>> import torch
    >>> fittable(torch.nn.Conv2d(1, 2, 3)), fittable(torch.nn.ConvTranspose2d(1, 2, 3))
    (True, False)
    """
    if isinstance(module, nn.Linear):
        return True
    conv: Any = module
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


class _Accumulator:
    """Float64 running sums of one layer, for one estimator.

    ``count[u]``: samples seen by unit ``u`` (for ``positive``: samples where it was active);
    ``sum_x``, ``sum_xy`` (shaped like the weight): sums of the input patch and of ``y * patch``;
    ``sum_y[u]``: sum of ``y``, where ``y = w^T x`` is the output without the bias.
    """

    def __init__(self, name: str, module: nn.Module, estimator: str) -> None:
        self.name = name
        self.module = module
        self.estimator = estimator
        self.layout = _layout(module)
        self.calls = 0
        self.count: Tensor | None = None
        self.sum_x: Tensor | None = None
        self.sum_y: Tensor | None = None
        self.sum_xy: Tensor | None = None

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            raise TypeError(
                f"fit: layer '{self.name}' ({type(module).__name__}) must be called with its input "
                "tensor as the first positional argument and return a tensor"
            )
        self.update(args[0], output)

    def update(self, x: Tensor, output: Tensor) -> None:
        """Add one call's input and output to the sums."""
        layout = self.layout
        x = layout.batched(x.detach().to(torch.float64))
        output = layout.batched(output.detach().to(torch.float64))
        y = layout.without_bias(output)
        units = output.shape[layout.unit_dim]
        if self.estimator == "positive":
            active = (output > 0).to(torch.float64)
            y = y * active
            count = layout.unit_sums(active)
            sum_x = layout.patch_products(x, active)
        else:
            count = y.new_full((units,), float(y.numel() // units))
            sum_x = layout.patch_sums(x, output)
        self._add(count, sum_x, layout.unit_sums(y), layout.patch_products(x, y))
        self.calls += 1

    def _add(self, count: Tensor, sum_x: Tensor, sum_y: Tensor, sum_xy: Tensor) -> None:
        if self.count is None:
            self.count, self.sum_x, self.sum_y, self.sum_xy = count, sum_x.clone(), sum_y, sum_xy
            return
        assert self.sum_x is not None and self.sum_y is not None and self.sum_xy is not None
        self.count += count
        self.sum_x += sum_x
        self.sum_y += sum_y
        self.sum_xy += sum_xy

    def pattern(self) -> Tensor:
        """``cov(x, y) / (w^T cov(x, y))`` per unit; zero (with a warning) where that is undefined."""
        assert self.count is not None and self.sum_x is not None and self.sum_y is not None and self.sum_xy is not None
        weight = self.module.weight.detach().to(device=self.sum_xy.device, dtype=torch.float64)  # type: ignore[union-attr]
        units = weight.shape[0]
        shape = (units, *([1] * (weight.ndim - 1)))
        count = self.count.clamp(min=1).view(shape)
        covariance = self.sum_xy / count - (self.sum_x / count) * (self.sum_y.view(shape) / count)
        scale = (weight * covariance).reshape(units, -1).sum(1)
        size = weight.reshape(units, -1).norm(dim=1) * covariance.reshape(units, -1).norm(dim=1)
        inactive = self.count == 0
        flat = ~inactive & (scale.abs() <= 1e-12 * size)
        undefined = inactive | flat
        if bool(undefined.any()):
            _warn_undefined(self.name, int(inactive.sum()), int(flat.sum()), units)
        safe = torch.where(undefined, torch.ones_like(scale), scale)
        pattern = covariance / safe.view(shape)
        return torch.where(undefined.view(shape), torch.zeros_like(pattern), pattern).cpu()


class UndefinedPatternWarning(UserWarning):
    """Some units of a layer got a zero pattern (never active, or no covariance with the input)."""


def _warn_undefined(name: str, inactive: int, flat: int, units: int) -> None:
    reasons = [
        f"{inactive} were never active (output > 0)" if inactive else "",
        f"{flat} have no covariance with their input" if flat else "",
    ]
    warnings.warn(
        f"fit: layer '{name}': {' and '.join(reason for reason in reasons if reason)} (of {units} "
        "units); their pattern is set to zero, so no signal passes them. A layer not followed by a "
        f"ReLU (the logits) needs the 'linear' estimator: estimator={{'{name}': 'linear', ...}}",
        UndefinedPatternWarning,
        stacklevel=4,
    )


# -- fit ---------------------------------------------------------------------------------------


def fit(
    model: nn.Module,
    loader: Iterable[Any],
    estimator: EstimatorChoice = "linear",
    layers: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> Patterns:
    """Estimate the signal pattern of every dense and convolutional layer from data.

    One pass over ``loader`` with forward hooks on the layers (removed afterwards, also when
    something fails) accumulates, in float64, the moments that the estimators of Kindermans et
    al. (2018) need, per output unit ``u`` with filter ``w_u`` and ``y_u = w_u^T x``:

    * ``"linear"`` (``S_a``): ``a_u = cov(x, y_u) / (w_u^T cov(x, y_u))``, with
      ``cov(x, y) = E[x y] - E[x] E[y]`` over all samples;
    * ``"positive"`` (the positive half ``a+`` of ``S_a+-``): the same, with every expectation
      taken over the samples where the unit is active (its output including the bias is ``> 0``):
      ``a+_u = cov+(x, y_u) / (w_u^T cov+(x, y_u))``. This is the pattern a layer followed by a
      ReLU needs: its relevance is zero wherever the unit is inactive.

    For a convolution, ``x`` ranges over the input patches (with zero padding) at every output
    position of every sample, per output channel. The model runs in ``eval()`` mode under
    ``torch.no_grad()``; each module's training flag is restored afterwards, and no parameter or
    buffer changes.

    Cost: one forward pass plus, per layer, two (``"linear"``) or three (``"positive"``) float64
    weight-gradient-sized accumulations per batch (see the module docstring).

    Parameters
    ----------
    model
        The model, on the device it is to run on.
    loader
        An iterable of input batches (a ``DataLoader``, a list of tensors, ...); a batch that is a
        tuple or list (``(x, y)``) contributes its first element.
    estimator
        ``"linear"`` or ``"positive"`` for every layer, or ``{layer name: estimator}``, which
        fits exactly those layers (e.g. ``"positive"`` below ReLUs, ``"linear"`` for the logits).
    layers
        Names of the layers to fit (``nn.Linear`` or ``nn.Conv1d/2d/3d``, see :func:`fittable`).
        ``None``: every such layer; those that do not run during the pass are left out with a
        warning.
    device
        Where the batches are moved; ``None``: the device of the model's first parameter.
    progress
        Called after each batch as ``progress(batches_done, samples_done)``.

    Returns
    -------
    Patterns
        ``{layer name: pattern}``, each shaped like the layer's weight (float64, CPU).

    Raises
    ------
    ValueError
        For an unknown estimator, unknown or unfittable layer names, no layer to fit, or a
        loader that yields no batch.
    RuntimeError
        If a layer named in ``layers`` (or ``estimator``) never ran during the pass.
    TypeError
        If a batch is not a tensor (or a tuple/list starting with one).

    Examples
    --------
    >>> import torch
    >>> signal = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    >>> distractor = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]])  # uncorrelated with the signal
    >>> x = signal * torch.tensor([1.0, 0.0]) + distractor * torch.tensor([1.0, 1.0])
    >>> layer = torch.nn.Linear(2, 1, bias=False)
    >>> with torch.no_grad():
    ...     _ = layer.weight.copy_(torch.tensor([[1.0, -1.0]]))  # cancels the distractor
    >>> fit(layer, [x])[""]  # the signal direction, not the filter
    tensor([[1., 0.]], dtype=torch.float64)
    """
    estimators = _estimators(model, estimator, layers)
    modules = dict(model.named_modules())
    accumulators = {name: _Accumulator(name, modules[name], choice) for name, choice in estimators.items()}
    batches = _run(model, loader, accumulators, _device(model, device), progress)
    if batches == 0:
        raise ValueError("fit: the loader yielded no batch")
    ran = _ran(accumulators, explicit=layers is not None or not isinstance(estimator, str))
    fitted: dict[str, Tensor] = {}
    for name in ran:  # a loop, not a comprehension: warnings then point at the caller
        fitted[name] = accumulators[name].pattern()
    return Patterns(fitted, {name: estimators[name] for name in ran})


def _estimators(model: nn.Module, estimator: EstimatorChoice, layers: Sequence[str] | None) -> dict[str, str]:
    """``{layer name: estimator}`` for the layers to fit, validated."""
    if isinstance(estimator, str):
        _checked_estimator(estimator)
        names = _layer_names(model, layers)
        return {name: estimator for name in names}
    if layers is not None and set(layers) != set(estimator):
        raise ValueError("fit: give the layers either as `layers` or as the keys of an `estimator` mapping, not both")
    names = _layer_names(model, list(estimator))
    return {name: _checked_estimator(estimator[name], name) for name in names}


def _layer_names(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    modules = dict(model.named_modules())
    if layers is None:
        names = [name for name, module in modules.items() if fittable(module)]
        _warn_skipped(modules, names)
        if not names:
            raise ValueError(f"fit: {type(model).__name__} has no nn.Linear or convolution to fit a pattern for")
        return names
    if isinstance(layers, str):
        raise TypeError(f"fit: layers must be a sequence of names, e.g. [{layers!r}], not a string")
    for name in layers:
        module = modules.get(name)
        if module is None:
            known = [key for key, value in modules.items() if fittable(value)]
            raise ValueError(f"fit: {type(model).__name__} has no layer '{name}'; layers with patterns: {known}")
        if not fittable(module):
            raise ValueError(
                f"fit: layer '{name}' ({type(module).__name__}) cannot get a pattern; only nn.Linear "
                "and nn.Conv1d/2d/3d with numeric zero padding can"
            )
    if not layers:
        raise ValueError("fit: layers is empty")
    return list(dict.fromkeys(layers))


def _warn_skipped(modules: Mapping[str, nn.Module], names: Sequence[str]) -> None:
    """Warn about dense-like layers that will get no pattern (and so a plain gradient)."""
    chosen = set(names)
    skipped = [
        f"'{name}' ({type(module).__name__})"
        for name, module in modules.items()
        if name not in chosen and isinstance(module, nn.modules.conv._ConvNd)
    ]
    if skipped:
        warnings.warn(
            f"fit: no pattern for {', '.join(skipped)} (transposed, string-padded or non-zero-padded "
            "convolutions are not supported); relevance passes them as a plain gradient",
            stacklevel=5,
        )


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _inputs(batch: Any) -> Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise TypeError(
            f"fit: a batch must be a tensor or a tuple/list whose first element is the input "
            f"tensor, got {type(batch).__name__}"
        )
    return batch


def _run(
    model: nn.Module,
    loader: Iterable[Any],
    accumulators: Mapping[str, _Accumulator],
    device: torch.device,
    progress: Progress | None,
) -> int:
    """Run the model over ``loader`` with the accumulating hooks; returns the number of batches."""
    batches = samples = 0
    with ExitStack() as stack:
        stack.enter_context(_eval_mode(model))
        for accumulator in accumulators.values():
            stack.callback(accumulator.module.register_forward_hook(accumulator.hook).remove)
        stack.enter_context(torch.no_grad())
        for batch in loader:
            x = _inputs(batch).to(device)
            model(x)
            batches += 1
            samples += x.shape[0] if x.ndim else 1
            if progress is not None:
                progress(batches, samples)
    return batches


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block; every module's own training flag is restored after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _ran(accumulators: Mapping[str, _Accumulator], explicit: bool) -> list[str]:
    """The layers that ran; an error (for layers asked for by name) or a warning for the others."""
    silent = [name for name, accumulator in accumulators.items() if accumulator.calls == 0]
    ran = [name for name in accumulators if name not in silent]
    if silent and (explicit or not ran):
        raise RuntimeError(
            f"fit: layer(s) {silent} never ran during the pass over the data, so they have no "
            "statistics; leave them out of `layers` (a module whose weight its parent uses "
            "directly, like nn.MultiheadAttention's out_proj, never runs)"
        )
    if silent:
        warnings.warn(
            f"fit: layer(s) {silent} never ran during the pass over the data and get no pattern "
            "(relevance passes them as a plain gradient)",
            stacklevel=3,
        )
    return ran


__all__ = [
    "ESTIMATORS",
    "KINDS",
    "PatternAttribution",
    "PatternComposite",
    "PatternNet",
    "Patterns",
    "UndefinedPatternWarning",
    "composite",
    "fit",
    "fittable",
]
