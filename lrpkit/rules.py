"""LRP rules: how relevance at a layer's output is distributed onto its inputs.

For a layer ``z_j = sum_i a_i w_ij + b_j`` and the relevance ``R_j`` from above, a rule returns
``R_i = a'_i * sum_j w'_ij R_j / stab(z'_j)``, where ``'`` marks the rule's modified inputs,
weights or outputs: a modified forward ``z'``, a division, one transposed product and a
multiplication by the (modified) input (Montavon et al., "Layer-Wise Relevance Propagation: An
Overview", 2019). Definitions follow zennit 0.5.1 unless a docstring says otherwise.

Closed forms are used for ``nn.Linear`` and all convolutions (see :mod:`lrpkit.ops`); any other
module with parameters takes a generic, slower path. Where the input is non-negative (after a
ReLU, checked once per call) the two-path forms of z+, gamma and alpha-beta collapse to their
single-path forms, which is where most of the speed comes from.

Every parameterised rule takes ``zero_params`` (a parameter name or a sequence of names, e.g.
``"bias"``) whose parameters are treated as zero, and ``top_k``: the relevance filter of
:func:`relevance_filter`, applied to the relevance arriving at the layer.

Examples
--------
>>> import torch
>>> from lrpkit import rules
>>> from lrpkit.composites import LayerMapComposite
>>> from lrpkit.attribution import Gradient
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> composite = LayerMapComposite([(torch.nn.Linear, rules.ZPlus(zero_params="bias"))])
>>> output, relevance = Gradient(model, composite)(torch.rand(1, 4))
>>> relevance.shape
torch.Size([1, 4])
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .core import LayerCall, Rule
from .ops import FunctionalOps, Params, Transpose, hooks_suspended, with_values
from .rectified import proportional_to_inputs, reads_output_only_where_relevant

Relevances = tuple[Tensor | None, ...]
ZeroParams = str | Sequence[str] | None


def stabilize(value: Tensor, epsilon: float, no_negative_zero: bool = False) -> Tensor:
    """``value + epsilon * sign(value)`` with ``sign(0) = +1`` for both zeros (zennit's stabiliser).

    Computed as ``copysign(epsilon, value + 0.0) + value`` in one new tensor: ``-0.0 + 0.0`` is
    ``+0.0``, so ``-0.0`` is stabilised upwards like ``+0.0``, and no boolean mask is built
    (``torch.where`` with a comparison is several times slower on the CPU). With
    ``no_negative_zero`` (the caller knows ``value`` holds no ``-0.0``, see
    :meth:`lrpkit.ops.LayerOps.output_has_no_negative_zero`) the ``+ 0.0`` pass is skipped.
    """
    if value.requires_grad and torch.is_grad_enabled():
        return value + torch.copysign(_scalar(epsilon, value), value + 0.0)
    if no_negative_zero:
        signs = torch.copysign(_scalar(epsilon, value), value)
    else:
        signs = value.add(0.0)
        torch.copysign(_scalar(epsilon, value), signs, out=signs)
    return signs.add_(value)


def _scalar(number: float, like: Tensor) -> Tensor:
    """``number`` as a 0-dim tensor of ``like``'s dtype on ``like``'s device (made once, cached)."""
    return _cached_scalar(number, like.dtype, like.device)


@functools.lru_cache(maxsize=64)
def _cached_scalar(number: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((), number, dtype=dtype, device=device)


def divide(relevance: Tensor, denominator: Tensor, epsilon: float, no_negative_zero: bool = False) -> Tensor:
    """``relevance / stabilize(denominator, epsilon)``.

    With ``epsilon == 0`` (LRP-0) an exactly zero denominator gives zero instead of NaN.
    ``no_negative_zero``: see :func:`stabilize`.
    """
    if epsilon > 0:
        stabilized = stabilize(denominator, epsilon, no_negative_zero)
        if _can_overwrite(stabilized, relevance):
            return torch.div(relevance, stabilized, out=stabilized)
        return relevance / stabilized
    quotient = relevance / denominator
    return torch.where(denominator == 0, torch.zeros_like(quotient), quotient)


def _divide_by_signed(relevance: Tensor, denominator: Tensor, epsilon: float, sign: int, owned: bool) -> Tensor:
    """``divide(relevance, denominator, epsilon)`` for a denominator known to have one sign.

    ``sign=+1``: ``denominator >= 0`` (``z+`` of non-negative inputs), stabilised as ``z + eps``,
    which is :func:`stabilize` there. ``sign=-1``: ``denominator <= 0`` (``z-``), stabilised as
    ``z - eps``; this differs from :func:`stabilize` only where ``z-`` is exactly zero, and there
    every contribution ``a_i w-_ij`` is zero, so the relevance is the same. Two passes: with
    ``owned`` the denominator is overwritten, else one new tensor is made.
    """
    if epsilon > 0 and _can_overwrite(denominator, relevance):
        stabilized = denominator.add_(sign * epsilon) if owned else denominator.add(sign * epsilon)
        return torch.div(relevance, stabilized, out=stabilized)
    return divide(relevance, denominator, epsilon)


def _can_overwrite(target: Tensor, other: Tensor) -> bool:
    """Whether ``target op other`` may be written into ``target`` (same shape and dtype, no graph)."""
    return (
        target.shape == other.shape
        and target.dtype == other.dtype
        and not (torch.is_grad_enabled() and (target.requires_grad or other.requires_grad))
    )


def _zero_names(zero_params: ZeroParams) -> tuple[str, ...]:
    """Normalise ``zero_params`` to a tuple of parameter names."""
    if zero_params is None:
        return ()
    if isinstance(zero_params, str):
        return (zero_params,)
    return tuple(zero_params)


def _with_bias(names: tuple[str, ...]) -> tuple[str, ...]:
    return names if "bias" in names else (*names, "bias")


def _check_nonnegative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {name}={value}")


def _modified(params: Params, modify: Callable[[Tensor], Tensor]) -> Params:
    """``modify`` applied to every parameter; ``modify`` must commute with a non-negative scale."""
    return with_values(params, {key: modify(value) for key, value in params.items()})


def _positive(params: Params) -> Params:
    return _modified(params, lambda value: value.clamp(min=0))


def _negative(params: Params) -> Params:
    return _modified(params, lambda value: value.clamp(max=0))


def _drop_bias(params: Params) -> Params:
    zeroed = {key: torch.zeros_like(value) if key == "bias" else value for key, value in params.items()}
    return with_values(params, zeroed)


def _times(factors: Sequence[Tensor], gradients: Sequence[Tensor | None], owned: bool = False) -> list[Tensor]:
    """``factor * gradient`` per input; ``owned``: the gradients are fresh and may be overwritten."""
    return [
        torch.zeros_like(factor)
        if gradient is None
        else gradient.mul_(factor)
        if owned and _can_overwrite(gradient, factor)
        else factor * gradient
        for factor, gradient in zip(factors, gradients)
    ]


def _sum(*terms: list[Tensor]) -> Relevances:
    return tuple(sum(parts[1:], parts[0]) for parts in zip(*terms))


def relevance_filter(relevance: Tensor, top_k: float) -> Tensor:
    """Keep the ``top_k`` fraction of largest relevance values of each sample, zero the rest.

    The relevance filter of Fischer ("Relevance Propagation with PyTorch", 2021): applied to the
    relevance arriving at a layer before its rule distributes it, it concentrates the
    explanation on the strongest evidence. Per sample (dimension 0), the
    ``k = max(1, floor(top_k * n))`` largest of the ``n`` values are kept (largest by value, as
    in the original); ties at the threshold are broken by ``torch.topk``. Samples do not affect
    each other. Cost: one ``topk`` and one scatter per layer, ``O(n log k)`` per sample.

    Examples
    --------
    >>> relevance_filter(torch.tensor([[0.1, 0.5, -0.2, 0.3]]), top_k=0.5)
    tensor([[0.0000, 0.5000, 0.0000, 0.3000]])
    """
    if relevance.ndim == 0 or relevance.shape[0] == 0 or top_k >= 1:
        return relevance
    flat = relevance.reshape(relevance.shape[0], -1)
    keep = max(1, int(top_k * flat.shape[1]))
    values, indices = flat.topk(keep, dim=1)
    return torch.zeros_like(flat).scatter_(1, indices, values).view_as(relevance)


def _check_top_k(top_k: float | None) -> float | None:
    if top_k is None:
        return None
    if not 0 < top_k <= 1:
        raise ValueError(f"top_k is the fraction of relevance values kept per sample, in (0, 1]; got top_k={top_k}")
    return float(top_k)


def _set_top_k(rule: "_Filtered", top_k: float | None) -> None:
    """Set the filter only when one is asked for (so reprs stay short without one)."""
    checked = _check_top_k(top_k)
    if checked is not None:
        rule.top_k = checked


class _Filtered(Rule):
    """Rules that can filter the incoming relevance to its ``top_k`` fraction (see :func:`relevance_filter`)."""

    top_k: float | None = None

    def incoming(self, relevance: Tensor) -> Tensor:
        return relevance if self.top_k is None else relevance_filter(relevance, self.top_k)


class _ParamRule(_Filtered):
    """Shared constructor of the rules that take a stabiliser, ``zero_params`` and ``top_k``."""

    def __init__(self, stabilizer: float = 1e-6, zero_params: ZeroParams = None, top_k: float | None = None) -> None:
        _check_nonnegative("stabilizer", stabilizer)
        self.stabilizer = float(stabilizer)
        self.zero_params = _zero_names(zero_params)
        _set_top_k(self, top_k)


class Epsilon(_Filtered):
    """LRP-epsilon (Bach et al. 2015): ``R_i = a_i sum_j w_ij R_j / (z_j + eps sign(z_j))``.

    ``epsilon=0`` gives LRP-0, which equals gradient x input on ReLU networks. The forward
    output ``z`` is reused, so the cost is exactly one input gradient.

    Parameters
    ----------
    epsilon
        Stabiliser added with the sign of ``z`` (``sign(0) = +1``); must be ``>= 0``.
    zero_params
        Parameter names treated as zero (e.g. ``"bias"``).
    top_k
        Keep only this fraction of the largest incoming relevance values per sample
        (:func:`relevance_filter`); ``None``: keep all.
    """

    needs_output = True

    def __init__(self, epsilon: float = 1e-6, zero_params: ZeroParams = None, top_k: float | None = None) -> None:
        _check_nonnegative("epsilon", epsilon)
        self.epsilon = float(epsilon)
        self.zero_params = _zero_names(zero_params)
        _set_top_k(self, top_k)

    @proportional_to_inputs
    @reads_output_only_where_relevant
    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        params = call.params(self.zero_params, homogeneous=True)
        output = _output_under(call, params, self.zero_params)
        scaled = _divide_by_output(call, relevance, output, self.epsilon)
        return tuple(_times(call.inputs, call.ops.transpose(call.inputs, params, scaled, owned=True), call.ops.fresh))


def _divide_by_output(call: LayerCall, relevance: Tensor, output: Tensor, epsilon: float) -> Tensor:
    """``divide(relevance, output, epsilon)`` with the fewest passes what is known about ``output`` allows.

    A lent ReLU output (``call.output_rectified``) is ``>= 0``: stabilised as ``output + eps``.
    The real output of a layer whose bias holds no ``-0.0`` skips the ``-0.0`` pass.
    """
    if output is call.output and call.output_rectified:
        return _divide_by_signed(relevance, output, epsilon, +1, owned=False)
    sign_known = output is call.output and call.ops.output_has_no_negative_zero()
    return divide(relevance, output, epsilon, sign_known)


def _output_under(call: LayerCall, params: Params, zeroed: tuple[str, ...]) -> Tensor:
    """The module's output with ``zeroed`` parameters at zero, reusing the real output if possible."""
    assert call.output is not None
    present = [name for name in zeroed if name in params]
    if not present:
        return call.output
    if present == ["bias"]:
        without = call.ops.without_bias(call.output, call.ops.scaled_params())
        if without is not None:
            return without
    return call.ops.forward(call.inputs, params)


class ZPlus(_ParamRule):
    """LRP-z+ (Montavon et al. 2017), generalised to signed inputs as in zennit.

    ``z = W+ a+ + b+ + W- a-`` (bias only in the positive part);
    ``R = a+ (W+^T s) + a- (W-^T s)`` with ``s = R_out / stab(z)``. On non-negative inputs this is
    the classic single-path z+ and costs one extra forward per layer.

    Parameters
    ----------
    stabilizer
        Added to the denominator with its sign; must be ``>= 0``.
    zero_params
        Parameter names treated as zero.
    top_k
        Keep only this fraction of the largest incoming relevance values per sample
        (:func:`relevance_filter`); ``None``: keep all.
    """

    @proportional_to_inputs
    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        params = call.params(self.zero_params, homogeneous=True)
        positive = _positive(params)
        inputs = call.inputs
        if call.inputs_nonnegative():
            output, transpose = call.ops.linearize(inputs, positive)
            scaled = _divide_by_signed(relevance, output, self.stabilizer, +1, call.ops.fresh)
            return tuple(_times(inputs, transpose(scaled, owned=True), call.ops.fresh))
        negative = _drop_bias(_negative(params))
        inputs_pos = [tensor.clamp(min=0) for tensor in inputs]
        inputs_neg = [tensor.clamp(max=0) for tensor in inputs]
        out_pos, transpose_pos = call.ops.linearize(inputs_pos, positive)
        out_neg, transpose_neg = call.ops.linearize(inputs_neg, negative)
        scaled = divide(relevance, out_pos + out_neg, self.stabilizer)
        return _sum(
            _times(inputs_pos, transpose_pos(scaled)),
            _times(inputs_neg, transpose_neg(scaled)),
        )


class AlphaBeta(_ParamRule):
    """LRP-alpha-beta (Bach et al. 2015): ``alpha`` times the positive, ``beta`` the negative share.

    Positive part ``zp = W+ a+ + b+ + W- a-``, negative part ``zn = W- a+ + b- + W+ a-``;
    ``R = alpha * (positive-part relevance) - beta * (negative-part relevance)``.

    Parameters
    ----------
    alpha, beta
        Weights of the two parts; both ``>= 0`` and ``alpha - beta == 1`` (conservation).
    stabilizer
        Added to the denominators with their sign; must be ``>= 0``.
    zero_params
        Parameter names treated as zero.
    top_k
        Keep only this fraction of the largest incoming relevance values per sample
        (:func:`relevance_filter`); ``None``: keep all.

    Raises
    ------
    ValueError
        If ``alpha`` or ``beta`` is negative or ``alpha - beta != 1``.
    """

    #: The saved output gives ``z- = z - z+`` on non-negative inputs (one forward less).
    needs_output = True

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 1.0,
        stabilizer: float = 1e-6,
        zero_params: ZeroParams = None,
        top_k: float | None = None,
    ) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must both be >= 0, got alpha={alpha}, beta={beta}")
        if alpha - beta != 1:
            raise ValueError(
                f"alpha - beta must equal 1 for relevance to be conserved, got alpha={alpha}, "
                f"beta={beta} (e.g. use alpha=2, beta=1 or alpha=1, beta=0)"
            )
        super().__init__(stabilizer, zero_params, top_k)
        self.alpha = float(alpha)
        self.beta = float(beta)

    @proportional_to_inputs
    @reads_output_only_where_relevant
    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        params = call.params(self.zero_params, homogeneous=True)
        inputs = call.inputs
        if call.inputs_nonnegative():
            return self._nonnegative(call, params, relevance)
        weight_pos, weight_neg = _positive(params), _negative(params)
        inputs_pos = [tensor.clamp(min=0) for tensor in inputs]
        inputs_neg = [tensor.clamp(max=0) for tensor in inputs]
        positive = _two_path(call, inputs_pos, weight_pos, inputs_neg, _drop_bias(weight_neg), relevance, self.stabilizer)
        if self.beta == 0:
            return positive
        negative = _two_path(call, inputs_pos, weight_neg, inputs_neg, _drop_bias(weight_pos), relevance, self.stabilizer)
        return tuple(self.alpha * p - self.beta * n for p, n in zip(positive, negative))

    def _nonnegative(self, call: LayerCall, params: Params, relevance: Tensor) -> Relevances:
        """Inputs ``a >= 0``: ``z+ = W+ a + b+`` by one forward, ``z- = z - z+`` from the output.

        ``W-^T t = W^T t - W+^T t`` turns ``alpha W+^T s+ - beta W-^T s-`` into
        ``beta (W+^T u - W^T s-)`` with ``u = s- + (alpha / beta) s+``, computed in one
        ``addcdiv`` pass together with ``s+`` itself. The transposed product with the layer's own
        weight takes the place of the one with ``W-``, which is never built (one pass over the
        weights and one weight-sized tensor less). Where ``z - z+`` cannot be trusted
        (:func:`_derived_negative_part`), ``z-`` is computed with ``W-``. Every tensor is let go
        as soon as it has been read, so that at most two layer-sized tensors are alive during a
        transposed product.
        """
        fresh, inputs, epsilon = call.ops.fresh, call.inputs, self.stabilizer
        out_pos, transpose_pos = call.ops.linearize(inputs, _positive(params))
        if self.beta == 0:
            scaled = _divide_by_signed(relevance, out_pos, epsilon, +1, fresh)
            return tuple(_times(inputs, transpose_pos(scaled, owned=True), fresh))
        out_neg = _derived_negative_part(call, params, out_pos, self.zero_params)
        if out_neg is None:
            out_neg, transpose_neg, owned = _direct_negative_part(call, params)
            share_pos = transpose_pos(_divide_by_signed(relevance, out_pos, epsilon, +1, fresh), owned=True)
            del transpose_pos, out_pos
            share_neg = transpose_neg(_divide_by_signed(relevance, out_neg, epsilon, -1, owned), owned=True)
            return tuple(
                _weighted_difference(a, p, n, self.alpha, self.beta, fresh) for a, p, n in zip(inputs, share_pos, share_neg)
            )
        scaled_neg = _divide_by_signed(relevance, out_neg, epsilon, -1, owned=True)
        del out_neg
        stabilized_pos = out_pos.add_(epsilon) if fresh else out_pos + epsilon
        del out_pos
        combined = torch.addcdiv(scaled_neg, relevance, stabilized_pos, value=self.alpha / self.beta, out=stabilized_pos)
        del stabilized_pos
        share_pos = transpose_pos(combined, owned=True)
        del transpose_pos, combined  # W+ and u
        share_plain = call.ops.transpose(inputs, params, scaled_neg, owned=True)
        del scaled_neg
        return tuple(
            _weighted_difference(a, p, n, self.beta, self.beta, fresh) for a, p, n in zip(inputs, share_pos, share_plain)
        )


def _weighted_difference(factor: Tensor, positive: Tensor, negative: Tensor, alpha: float, beta: float, owned: bool) -> Tensor:
    """``factor * (alpha * positive - beta * negative)``, in place when the shares are owned.

    With ``alpha - beta == 1`` the weighted difference is ``positive + (-beta) * (negative -
    positive)``: one ``lerp_`` pass instead of two; with ``alpha == 1`` no scaling pass of
    ``positive`` is needed.
    """
    if owned and _can_overwrite(positive, factor) and _can_overwrite(negative, factor):
        if alpha - beta == 1:
            return positive.lerp_(negative, -beta).mul_(factor)
        scaled = positive if alpha == 1 else positive.mul_(alpha)
        return scaled.sub_(negative, alpha=beta).mul_(factor)
    return factor * (alpha * positive - beta * negative)


#: Relative size, in units of the dtype's epsilon, below which ``z - z+`` is not trusted as ``z-``.
_CANCELLATION_ULPS = 2.0**12


def _derived_negative_part(call: LayerCall, params: Params, out_pos: Tensor, zeroed: tuple[str, ...]) -> Tensor | None:
    """``z- = W- a + b-`` as ``z - z+`` from the saved output ``z`` (non-negative inputs only), or ``None``.

    ``z = z+ + z-`` for ``a >= 0``: one layer-sized forward less. Where that difference is small
    against ``z+`` it would be mostly rounding error (cancellation), so then (and when the output
    cannot be reused) ``None`` tells the caller to compute ``z-`` directly: the result is
    accurate to the dtype either way. The result is a new tensor.
    """
    if call.output is None or _zeroes_weights(params, zeroed):
        return None
    derived = _output_under(call, params, zeroed) - out_pos
    tolerance = _CANCELLATION_ULPS * torch.finfo(derived.dtype).eps
    # z+ >= 0 and z- <= 0 here, so "|z-| >= tolerance * |z+|" is "z- + tolerance * z+ <= 0"
    if derived.numel() == 0 or bool(torch.add(derived, out_pos, alpha=tolerance).max() <= 0):
        return derived
    return None


def _zeroes_weights(params: Params, zeroed: tuple[str, ...]) -> bool:
    """Whether ``zeroed`` names a parameter other than the bias (the output then cannot be reused)."""
    return any(name in params and name != "bias" for name in zeroed)


def _direct_negative_part(call: LayerCall, params: Params) -> tuple[Tensor, Transpose, bool]:
    """``z- = W- a + b-`` by a forward with ``W-``, its transposed product, whether it is owned."""
    weight_neg = _negative(params)
    output = call.ops.forward(call.inputs, weight_neg)
    return output, lambda grad, owned=False: call.ops.transpose(call.inputs, weight_neg, grad, owned), call.ops.fresh


def _two_path(
    call: LayerCall,
    inputs_a: Sequence[Tensor],
    params_a: Params,
    inputs_b: Sequence[Tensor],
    params_b: Params,
    relevance: Tensor,
    stabilizer: float,
) -> Relevances:
    """``a (Wa^T s) + b (Wb^T s)`` with ``s = R / stab(Wa a + Wb b)``: one part of a signed rule."""
    out_a, transpose_a = call.ops.linearize(inputs_a, params_a)
    out_b, transpose_b = call.ops.linearize(inputs_b, params_b)
    scaled = divide(relevance, out_a + out_b, stabilizer)
    return _sum(_times(inputs_a, transpose_a(scaled)), _times(inputs_b, transpose_b(scaled)))


class Gamma(_ParamRule):
    """LRP-gamma (Montavon et al. 2019), generalised to signed inputs and outputs as in zennit.

    With ``Wp = W + gamma W+`` and ``Wn = W + gamma W-``: where the real output ``z > 0``, relevance
    flows through ``Wp a+ + Wn a-`` (+ ``b + gamma b+``); where ``z < 0``, through
    ``Wn a+ + Wp a-`` (+ ``b + gamma b-``); where ``z == 0`` nothing flows. On non-negative inputs
    a part with no relevance to carry (e.g. negative outputs below a ReLU) is skipped.

    Parameters
    ----------
    gamma
        Weight of the added positive (resp. negative) parameters; must be ``>= 0``.
    stabilizer
        Added to the denominators with their sign; must be ``>= 0``.
    zero_params
        Parameter names treated as zero.
    top_k
        Keep only this fraction of the largest incoming relevance values per sample
        (:func:`relevance_filter`); ``None``: keep all.
    """

    needs_output = True

    def __init__(
        self, gamma: float = 0.25, stabilizer: float = 1e-6, zero_params: ZeroParams = None, top_k: float | None = None
    ) -> None:
        _check_nonnegative("gamma", gamma)
        super().__init__(stabilizer, zero_params, top_k)
        self.gamma = float(gamma)

    @proportional_to_inputs
    @reads_output_only_where_relevant
    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        assert call.output is not None
        params = call.params(self.zero_params, homogeneous=True)
        inputs = call.inputs
        nonnegative = call.inputs_nonnegative()
        weights_kept = not _zeroes_weights(params, _zero_names(self.zero_params))
        if not call.output_rectified and nonnegative and weights_kept and _has_both_signs(call.output):
            return self._both_signs(call, params, relevance)
        if call.output_rectified:  # relevance only where the output is > 0: nothing to split
            parts = [(relevance, self._lifted, self._lowered)]
        else:
            positive, negative = _split_by_sign(relevance, call.output)
            signs = [(positive, self._lifted, self._lowered), (negative, self._lowered, self._lifted)]
            parts = [(rel, first, second) for rel, first, second in signs if _any_nonzero(rel)]
        if nonnegative:
            carried = [self._single(call, inputs, first(params), rel) for rel, first, _ in parts]
        else:
            inputs_pos = [tensor.clamp(min=0) for tensor in inputs]
            inputs_neg = [tensor.clamp(max=0) for tensor in inputs]
            needed = dict.fromkeys(modify for _, first, second in parts for modify in (first, second))
            modified = {modify: modify(params) for modify in needed}  # each weight set made once
            carried = [
                list(_two_path(call, inputs_pos, modified[first], inputs_neg, _drop_bias(modified[second]), rel, self.stabilizer))
                for rel, first, second in parts
            ]
        return _sum(*carried) if carried else tuple(torch.zeros_like(tensor) for tensor in inputs)

    def _lifted(self, params: Params) -> Params:
        """``W + gamma W+`` (and the bias likewise)."""
        return _modified(params, lambda value: value.clamp(min=0).mul_(self.gamma).add_(value))

    def _lowered(self, params: Params) -> Params:
        """``W + gamma W-`` (and the bias likewise)."""
        return _modified(params, lambda value: value.clamp(max=0).mul_(self.gamma).add_(value))

    def _single(self, call: LayerCall, inputs: Sequence[Tensor], params: Params, relevance: Tensor) -> list[Tensor]:
        output, transpose = call.ops.linearize(inputs, params)
        scaled = divide(relevance, output, self.stabilizer, call.ops.computes_no_negative_zero(params))
        del output  # not alive during the transposed product
        return _times(inputs, transpose(scaled, owned=True), call.ops.fresh)

    def _both_signs(self, call: LayerCall, params: Params, relevance: Tensor) -> Relevances:
        """Gamma for an output ``z`` of both signs on inputs ``a >= 0``, with one modified forward.

        Relevance at ``z > 0`` is divided by the lifted output ``z_L = z + gamma p`` and at
        ``z < 0`` by the lowered one ``z_D = z + gamma (z - p)``, where ``p = W+ a + b+`` (so
        ``z - p = W- a + b-``); at ``z == 0`` it is dropped. With ``sigma = sign(z)`` and
        ``c = 1, 1 + gamma, 0`` where ``z > 0, < 0, == 0``, both denominators are
        ``D = c z + gamma sigma p`` and the quotient ``s = R / D`` is one tensor. Since
        ``W + gamma W- = (1 + gamma) W - gamma W+``, the two transposed products become
        ``W^T (c s) + gamma W+^T (sigma s)``: one forward and two transposed products, with ``W``
        and ``W+``, instead of two of each with two modified weight sets, and about half the
        element-wise passes of splitting the relevance by sign. Each denominator adds terms of
        one sign where its relevance lives, so nothing cancels. Where no relevance sits at
        ``z < 0`` (``c s == sigma s``, one comparison; e.g. a ReLU above that does not lend its
        output) the two products are one, with ``W + gamma W+``.
        """
        gamma, fresh = self.gamma, call.ops.fresh
        output = _output_under(call, params, _zero_names(self.zero_params))
        sign = torch.sign(call.output)
        weight = torch.mul(sign, -gamma / 2).addcmul_(sign, sign, value=1 + gamma / 2)  # c: 1, 1 + gamma, 0
        positive = _positive(params)
        lifted, transpose_pos = call.ops.linearize(call.inputs, positive)
        denominator = lifted.mul_(sign) if fresh else lifted * sign
        denominator = denominator.mul_(gamma).addcmul_(output, weight)
        del lifted
        scaled = divide(relevance, denominator, self.stabilizer)
        del denominator
        weighted, signed = weight.mul_(scaled), sign.mul_(scaled)
        del scaled
        if torch.equal(weighted, signed):  # no relevance where z < 0: W^T s + gamma W+^T s in one product
            del signed, transpose_pos
            lifted = {key: value.mul_(gamma).add_(params[key]) for key, value in positive.items()}  # in W+
            lifted_params = with_values(params, lifted)
            products = call.ops.transpose(call.inputs, lifted_params, weighted, owned=True)
            return tuple(_times(call.inputs, products, fresh))
        del positive
        through_positive = transpose_pos(signed, owned=True)
        through_weight = call.ops.transpose(call.inputs, params, weighted, owned=True)
        del signed, weighted
        combined = [
            None if plain is None else (plain.add_(extra, alpha=gamma) if fresh else plain + gamma * extra)
            for plain, extra in zip(through_weight, through_positive)
        ]
        return tuple(_times(call.inputs, combined, fresh))


def _has_both_signs(tensor: Tensor) -> bool:
    """Whether ``tensor`` has a positive and a negative entry: one reduction."""
    if tensor.numel() == 0:
        return False
    low, high = torch.aminmax(tensor)
    return bool((low < 0) & (high > 0))


def _any_nonzero(tensor: Tensor) -> bool:
    """Whether ``tensor`` has a non-zero (or NaN) entry: one reduction, no boolean copy."""
    if tensor.numel() == 0:
        return False
    low, high = torch.aminmax(tensor)
    return bool((low != 0) | (high != 0))


def _split_by_sign(relevance: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
    """``relevance`` where ``output > 0`` and where ``output < 0`` (zero elsewhere).

    Uses ``sign(output)`` clamped to ``{0, 1}`` as float masks: no boolean tensors, which are
    slow to build and select with on the CPU.
    """
    positive = torch.sign(output)
    negative = positive.neg().clamp_(min=0)
    positive.clamp_(min=0)
    return positive.mul_(relevance), negative.mul_(relevance)


class ZBox(_ParamRule):
    """LRP-z^B (Montavon et al. 2017) for inputs bounded by ``low <= a <= high``.

    ``z = (W a + b) - (W+ l + b+) - (W- h + b-)``, ``s = R / stab(z)``,
    ``R = a (W^T s) - l (W+^T s) - h (W-^T s)``. Meant for the first layer (pixel space).

    Parameters
    ----------
    low, high
        Lowest and highest input values: floats, or tensors broadcastable to the input (e.g. per
        channel, shape ``(1, C, 1, 1)``).
    stabilizer
        Added to the denominator with its sign; must be ``>= 0``.
    zero_params
        Parameter names treated as zero.
    top_k
        Keep only this fraction of the largest incoming relevance values per sample
        (:func:`relevance_filter`); ``None``: keep all.
    """

    def __init__(
        self,
        low: float | Tensor,
        high: float | Tensor,
        stabilizer: float = 1e-6,
        zero_params: ZeroParams = None,
        top_k: float | None = None,
    ) -> None:
        super().__init__(stabilizer, zero_params, top_k)
        self.low = low
        self.high = high

    #: ``W a + b`` is the saved output: two forwards instead of three.
    needs_output = True
    #: The constant of an explicit ``F.pad`` is bounded by itself: it gets no relevance.
    reads_padding = True

    @reads_output_only_where_relevant
    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        params = call.params(self.zero_params, homogeneous=True)
        inputs = call.inputs
        lows, highs = (list(bounds) for bounds in zip(*(self._bounds(call, index) for index in range(len(inputs)))))
        fresh = call.ops.fresh  # then the outputs are ours to overwrite: two layer-sized tensors at a time
        output = _output_under(call, params, self.zero_params)
        out_low, transpose_low = call.ops.linearize(lows, _positive(params))
        denominator = torch.sub(output, out_low, out=out_low) if fresh else output - out_low
        del out_low, output
        out_high, transpose_high = call.ops.linearize(highs, _negative(params))
        denominator = denominator.sub_(out_high)  # a new tensor either way
        del out_high
        scaled = divide(relevance, denominator, self.stabilizer)
        del denominator
        return tuple(
            a.sub_(lo).sub_(hi) if fresh else a - lo - hi
            for a, lo, hi in zip(
                _times(inputs, call.ops.transpose(inputs, params, scaled), fresh),
                _times(lows, transpose_low(scaled)),
                _times(highs, transpose_high(scaled)),
            )
        )


    def _bounds(self, call: LayerCall, index: int) -> tuple[Tensor, Tensor]:
        """The bounds of input ``index``; where an explicit ``F.pad`` put its constant, that constant (see :meth:`LayerCall.padded`)."""
        tensor = call.inputs[index]
        low, high = _bound(self.low, tensor, "low", call), _bound(self.high, tensor, "high", call)
        padded = call.padded(index)
        if padded is None:
            return low, high
        return torch.where(padded, tensor, low), torch.where(padded, tensor, high)


def _bound(bound: float | Tensor, like: Tensor, which: str, call: LayerCall) -> Tensor:
    """Broadcast a z^B bound to the input's shape, or say clearly why it cannot be."""
    if not isinstance(bound, Tensor):
        return torch.full_like(like, float(bound))
    bound = bound.to(like)
    if bound.ndim == like.ndim and bound.shape[0] > like.shape[0]:
        bound = bound[: like.shape[0]]
    try:
        return bound.expand(like.shape)
    except RuntimeError:
        raise ValueError(
            f"ZBox {which} bound of shape {tuple(bound.shape)} cannot be broadcast to the input of "
            f"module {call.describe()} of shape {tuple(like.shape)}; pass a float or a tensor such "
            "as shape (1, C, 1, 1) for per-channel bounds"
        ) from None


class _UniformInputRule(_ParamRule):
    """Rules that set the inputs to one and modify the weights: ``R = W'^T (R / stab(W' 1))``.

    The constant of an explicit ``F.pad`` stays zero (see :meth:`LayerCall.padded`): as behind a
    layer's own zero padding, relevance is spread over the real inputs only.
    """

    reads_padding = True

    def weights(self, params: Params) -> Params:
        raise NotImplementedError

    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        params = self.weights(call.params(_with_bias(self.zero_params)))
        ones = [_ones_but_padding(call, index) for index in range(len(call.inputs))]
        output, transpose = call.ops.linearize(ones, params)
        return transpose(divide(relevance, output, self.stabilizer))


def _ones_but_padding(call: LayerCall, index: int) -> Tensor:
    padded = call.padded(index)
    ones = torch.ones_like(call.inputs[index])
    return ones if padded is None else ones.masked_fill_(padded, 0.0)


class Flat(_UniformInputRule):
    """LRP-flat (Lapuschkin et al. 2019): relevance spread uniformly over each receptive field.

    All weights and inputs are set to one and the bias to zero, so ``R_i = sum_j R_j / n_j`` with
    ``n_j`` the number of inputs connected to ``j``. Meant for the first layer.
    """

    def weights(self, params: Params) -> Params:
        return {key: value if key == "bias" else torch.ones_like(value) for key, value in params.items()}


class WSquare(_UniformInputRule):
    """LRP-w^2 (Montavon et al. 2017): ``R_i = sum_j w_ij^2 R_j / sum_i' w_i'j^2``.

    The bias is always zero here, as in the rule's definition; zennit 0.5.1 squares the bias
    instead, which breaks conservation (both agree with ``zero_params="bias"``).
    """

    def weights(self, params: Params) -> Params:
        return {key: value if key == "bias" else value * value for key, value in params.items()}


class _StabilizedRule(Rule):
    """Shared constructor of the parameter-free rules that only take a stabiliser."""

    needs_output = True

    def __init__(self, stabilizer: float = 1e-6) -> None:
        _check_nonnegative("stabilizer", stabilizer)
        self.stabilizer = float(stabilizer)


class Norm(_StabilizedRule):
    """Proportional split for parameter-free linear maps (sum/average pooling, additions, resampling).

    ``R_i = a_i J^T (R / stab(z))`` with ``z`` the layer's real output: each input receives its
    share of every output it contributes to.

    Where ``z`` is exactly zero and relevance arrives all the same, the proportional split is
    ``0 / 0``. Only a rule that gives relevance to an input for what it could have been (z^B,
    flat or w^2 on a first layer) sends relevance there: to the background of an image that the
    model resized, pooled or summed before that layer (on the 8x8 digits upsampled inside the
    model, EpsilonPlusFlat lost up to 39 % of the logit so). That relevance is split by the
    weights (:func:`_spread_by_weights`): the limit of the proportional split as the inputs go to
    zero together; where inputs cancel (``x - y`` with ``x == y``) the stabilised split would
    hand them huge opposite shares, and the weights split it too. Only a call that such a rule's
    layer was computed from is checked, and not when a certificate says the relevance is zero
    there.

    Parameters
    ----------
    stabilizer
        Added to the denominator with its sign; must be ``>= 0``.
    """

    @proportional_to_inputs
    @reads_output_only_where_relevant
    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        stranded = _where_output_is_zero(call, relevance)
        if stranded is None:
            return _proportional_shares(call, relevance, self.stabilizer)
        shares = _proportional_shares(call, relevance - stranded, self.stabilizer)
        return _spread_by_weights(call, stranded, shares)


def _proportional_shares(call: LayerCall, relevance: Tensor, stabilizer: float) -> Relevances:
    """``a_i J^T (R / stab(z))`` for every input."""
    assert call.output is not None
    scaled = _divide_by_output(call, relevance, call.output, stabilizer)
    gradients = call.ops.transpose(call.inputs, call.params(), scaled)
    return tuple(_times_reusing(call.inputs, gradients, scaled, call.ops.fresh))


def _where_output_is_zero(call: LayerCall, relevance: Tensor) -> Tensor | None:
    """The relevance that arrived where the real output is exactly zero; ``None``: none can have."""
    output = call.output
    if not call.relevance_at_zero_outputs or output is None or relevance.shape != output.shape:
        return None
    stranded = torch.where(output == 0, relevance, 0)
    return stranded if bool(stranded.any()) else None


def _spread_by_weights(call: LayerCall, stranded: Tensor, shares: Relevances) -> Relevances:
    """``shares`` (of the other relevance) plus the relevance ``stranded`` at zero outputs, split by the weights.

    Input ``k``'s weight at an output is ``w_k = f(1) - f(1 with input k at 0)`` (its linear part
    at ones: a constant argument, as in ``x + c``, is none). Each output's relevance goes to the
    inputs in proportion to ``|w_k|``, and within input ``k`` by its map, ``J_k^T (R sign(w_k) /
    sum |w|)``: a pooling or resampling splits it by its weights, an addition or subtraction
    into equal halves, a product among its factors. The spread relevance is not zero where the
    inputs are, so this call's relevance gets no certificate.
    """
    call.uncertified = True
    params = call.params()
    ones = tuple(torch.ones_like(tensor) for tensor in call.inputs)
    full = call.ops.forward(ones, params)
    weights = [full - call.ops.forward(ones[:k] + (torch.zeros_like(one),) + ones[k + 1:], params) for k, one in enumerate(ones)]
    total = functools.reduce(torch.add, [weight.abs() for weight in weights])
    per_total = stranded / total.where(total != 0, 1)
    spread = list(shares)
    for k, weight in enumerate(weights):
        extra = call.ops.transpose(ones, params, per_total * torch.sign(weight))[k]
        if extra is not None:
            spread[k] = extra if spread[k] is None else spread[k] + extra
    return tuple(spread)


def _times_reusing(
    factors: Sequence[Tensor], gradients: Sequence[Tensor | None], scratch: Tensor, fresh: bool
) -> list[Tensor]:
    """``_times``, where the transposed product may hand back ``scratch`` itself (a sum's ``J^T s = s``).

    ``scratch`` is a tensor the rule made and no longer needs: the last product that would read it
    overwrites it instead of making a new tensor.
    """
    last = max((index for index, gradient in enumerate(gradients) if gradient is scratch), default=None)
    products = []
    for index, (factor, gradient) in enumerate(zip(factors, gradients)):
        if index == last and _can_overwrite(scratch, factor):
            products.append(scratch.mul_(factor))
        elif gradient is scratch:
            products.append(factor * scratch)
        else:
            products.extend(_times([factor], [gradient], fresh))
    return products


class Product(Norm):
    """Relevance of a product split equally among the factors that carry it.

    ``R_k = a_k J_k^T (R / stab(z)) / n`` for the ``n`` factors that receive relevance, ``z`` the
    real output. For a product that is linear in each factor (``x * y``, ``A @ V``) every term
    ``a_k J_k^T`` reproduces ``z``, so the split conserves relevance: this is the uniform rule
    for multiplications of AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise
    Relevance Propagation for Transformers", ICML 2024). With one factor (the others being
    gates, parameters or divisors, held constant by the capture) it is the epsilon rule of the
    resulting linear map, and all relevance goes to the signal.

    Parameters
    ----------
    stabilizer
        Added to the denominator with its sign; must be ``>= 0``.
    """

    @proportional_to_inputs
    @reads_output_only_where_relevant
    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        stranded = _where_output_is_zero(call, relevance)
        shares = _proportional_shares(call, relevance if stranded is None else relevance - stranded, self.stabilizer)
        shares = tuple(None if share is None else share / len(shares) for share in shares)
        return shares if stranded is None else _spread_by_weights(call, stranded, shares)


class LayerNormConstant(_StabilizedRule):
    """Layer, group, instance and RMS normalisation with the standard deviation held constant (CP-LRP).

    ``y = gamma (x - mean(x)) / sigma + beta`` is linear in ``x`` once ``sigma`` is a constant;
    the epsilon rule of that linear map gives ``R_x = x (g - mean(g))`` with
    ``g = gamma R / (sigma stab(y))``, which conserves relevance when ``beta = 0`` (Ali et al.,
    "XAI for Transformers: Better Explanations through Conservative Propagation", ICML 2022;
    used by AttnLRP, Achtibat et al. 2024). The mean and ``sigma`` are taken over what the
    normalisation normalises: the trailing ``normalized_shape`` (layer norm), each group of
    channels (group norm), each channel (instance norm). RMS normalisation subtracts no mean
    (``R_x = x g``, ``sigma`` the root mean square), nor does an instance norm that uses its
    running statistics (then ``sigma`` is theirs).

    Works on captured ``F.layer_norm``, ``F.group_norm``, ``F.instance_norm`` and ``F.rms_norm``
    calls (the default for them: what ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm*d``
    and ``nn.RMSNorm`` run) and on those modules themselves.

    Parameters
    ----------
    stabilizer
        Added to the denominator with its sign; must be ``>= 0``.
    """

    @proportional_to_inputs
    @reads_output_only_where_relevant
    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        assert call.output is not None
        (x,) = call.inputs
        norm = _normalization(call, x)
        scaled = divide(relevance, call.output, self.stabilizer)
        if norm.weight is not None:
            scaled = scaled * norm.weight
        grouped_x = norm.grouped(x)
        grouped = norm.grouped(scaled) / norm.sigma(grouped_x)
        if norm.centred:
            grouped = grouped - grouped.mean(-1, keepdim=True)
        return ((grouped_x * grouped).reshape(x.shape),)


class _Normalization:
    """What :class:`LayerNormConstant` needs of one normalisation call on ``x``.

    ``grouped(t)`` views an ``x``-shaped tensor with the normalised values of each group along
    the last dimension; ``weight`` broadcasts against ``x`` (``None``: no scale); ``running_std``
    replaces the statistics of the input (an instance norm with running statistics).
    """

    def __init__(
        self,
        x: Tensor,
        leading: int,
        weight: Tensor | None,
        eps: float,
        centred: bool = True,
        running_std: Tensor | None = None,
    ) -> None:
        self.shape = (*x.shape[:leading], -1)
        self.weight = weight
        self.eps = eps
        self.centred = centred and running_std is None
        self.running_std = running_std

    def grouped(self, tensor: Tensor) -> Tensor:
        return tensor.reshape(self.shape)

    def sigma(self, grouped_x: Tensor) -> Tensor:
        if self.running_std is not None:
            return self.running_std
        if self.centred:
            return torch.sqrt(grouped_x.var(-1, unbiased=False, keepdim=True) + self.eps)
        return torch.sqrt(grouped_x.pow(2).mean(-1, keepdim=True) + self.eps)


def _normalization(call: LayerCall, x: Tensor) -> _Normalization:
    """The :class:`_Normalization` of a captured ``layer_norm``/``group_norm``/``instance_norm``/``rms_norm`` call or module."""
    op, arguments = _normalization_call(call)
    weight = _detached(arguments.get("weight"))
    if op in ("layer_norm", "rms_norm"):
        eps = arguments.get("eps")
        eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
        leading = x.ndim - len(tuple(arguments["normalized_shape"]))
        return _Normalization(x, leading, weight, eps, centred=op == "layer_norm")
    channel = None if weight is None else weight.reshape(-1, *[1] * (x.ndim - 2))  # per channel, dim 1
    if op == "group_norm":
        return _Normalization(x.reshape(x.shape[0], int(arguments["num_groups"]), -1), 2, channel, float(arguments["eps"]))
    running = None
    if not arguments["use_input_stats"]:
        variance = _detached(arguments["running_var"])
        running = torch.sqrt(variance + float(arguments["eps"])).reshape(1, -1, 1)
    return _Normalization(x.reshape(x.shape[0], x.shape[1], -1), 2, channel, float(arguments["eps"]), running_std=running)


def _detached(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach()


#: Normalisation modules, by the functional call their ``forward`` makes with their attributes.
_NORM_MODULES: dict[type[torch.nn.Module], tuple[str, Callable[[Any], dict[str, Any]]]] = {
    torch.nn.LayerNorm: ("layer_norm", lambda m: {"normalized_shape": m.normalized_shape, "weight": m.weight, "eps": m.eps}),
    torch.nn.RMSNorm: ("rms_norm", lambda m: {"normalized_shape": m.normalized_shape, "weight": m.weight, "eps": m.eps}),
    torch.nn.GroupNorm: ("group_norm", lambda m: {"num_groups": m.num_groups, "weight": m.weight, "eps": m.eps}),
    **{
        cls: (
            "instance_norm",
            lambda m: {
                "running_var": m.running_var,
                "weight": m.weight,
                "use_input_stats": m.training or not m.track_running_stats,
                "eps": m.eps,
            },
        )
        for cls in (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)
    },
}
_NORM_CALLS = {
    "layer_norm": torch.nn.functional.layer_norm,
    "rms_norm": torch.nn.functional.rms_norm,
    "group_norm": torch.nn.functional.group_norm,
    "instance_norm": torch.nn.functional.instance_norm,
}


def _normalization_call(call: LayerCall) -> tuple[str, dict[str, Any]]:
    """``(op, arguments by name)`` of the normalisation a rule explains (a captured call or a module)."""
    module_kind = _NORM_MODULES.get(type(call.module))
    if module_kind is not None and len(call.inputs) == 1:
        op, arguments = module_kind
        return op, arguments(call.module)
    op = getattr(call.module, "op", None)
    if isinstance(call.ops, FunctionalOps) and op in _NORM_CALLS:
        return op, _bind(_NORM_CALLS[op], call.ops.arguments(call.inputs))
    raise TypeError(
        f"LayerNormConstant explains captured layer_norm, group_norm, instance_norm and rms_norm calls "
        f"and the nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm*d and nn.RMSNorm modules; {call.describe()} "
        "is none of them. Leave the module without a rule: FunctionalCapture then captures the "
        "normalisation call inside it"
    )


def _bind(func: Callable[..., object], arguments: tuple[tuple[object, ...], dict[str, object]]) -> dict[str, Any]:
    """The call's arguments by parameter name (defaults filled in)."""
    args, kwargs = arguments
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class AttentionValue(_StabilizedRule):
    """Attention explained through its value path, the attention weights held constant (CP-LRP).

    With the softmax output ``A`` fixed, ``out = W_o (A (W_v v + b_v)) + b_o`` is linear in the
    value input, and the epsilon rule of that map gives the value's relevance; queries and keys
    receive none (Ali et al., "XAI for Transformers: Better Explanations through Conservative
    Propagation", ICML 2022). Conserves relevance when the projection biases are zero.

    Works on captured ``F.scaled_dot_product_attention`` and ``F.multi_head_attention_forward``
    calls (what ``nn.MultiheadAttention`` runs); their value input is the only relevance input.

    Parameters
    ----------
    stabilizer
        Added to the denominator with its sign; must be ``>= 0``.
    """

    @proportional_to_inputs
    @reads_output_only_where_relevant
    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        assert call.output is not None
        transpose = _value_transpose(call)
        scaled = divide(relevance, call.output, self.stabilizer)
        (value,) = call.inputs
        gradient = transpose(scaled)
        return (gradient.mul_(value) if _can_overwrite(gradient, value) else value * gradient,)


def _value_transpose(call: LayerCall) -> Callable[[Tensor], Tensor]:
    """``grad -> J^T grad`` of the attention call as a linear map of its value input (weights fixed).

    Closed form: no forward of the value path and no autograd graph, only the transposed
    products (the output projection, the attention weights, the value projection).
    """
    op = getattr(call.module, "op", None)
    if not isinstance(call.ops, FunctionalOps) or len(call.inputs) != 1:
        op = None
    if op == "scaled_dot_product_attention":
        return _sdpa_value_transpose(_bind(_sdpa_signature, call.ops.arguments()), call.inputs[0].shape)
    if op == "multi_head_attention_forward":
        return _mha_value_transpose(_bind(torch.nn.functional.multi_head_attention_forward, call.ops.arguments()), call)
    raise TypeError(
        f"AttentionValue explains captured scaled_dot_product_attention and "
        f"multi_head_attention_forward calls; {call.describe()} is neither"
    )


def _sdpa_signature(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> None:
    """The signature of ``F.scaled_dot_product_attention`` (a builtin, not inspectable)."""


def _attention_weights(query: Tensor, key: Tensor, mask: Tensor | None, causal: bool, scale: float | None) -> Tensor:
    """``softmax(q k^T * scale + mask)`` as ``F.scaled_dot_product_attention`` computes it."""
    factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * factor
    if causal:
        length, source = scores.shape[-2:]
        allowed = torch.ones(length, source, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1)
    if causal or mask is not None:
        # a query that may attend to nothing (a left-padded position under a causal mask):
        # scaled_dot_product_attention returns zeros there, softmax NaN
        weights = weights.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    return weights


def _sdpa_value_transpose(bound: dict[str, Any], value_shape: torch.Size) -> Callable[[Tensor], Tensor]:
    """``grad -> A^T grad`` for ``out = A value``, summed over the batch dimensions ``value`` is broadcast in.

    With ``enable_gqa`` (grouped-query attention: Llama, Mistral, Qwen2, ...) each key and value
    head serves ``groups`` consecutive query heads, as ``repeat_interleave`` along the head
    dimension gives them; a value head's relevance is the sum over its group.
    """
    if bound["dropout_p"]:
        raise NotImplementedError(
            "AttentionValue needs scaled_dot_product_attention without dropout; call the model in eval() mode"
        )
    key, groups = bound["key"], 1
    if bound["enable_gqa"] and key.dim() >= 3:
        groups = bound["query"].shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
    weights = _attention_weights(bound["query"], key, bound["attn_mask"], bound["is_causal"], bound["scale"])

    def transpose(grad: Tensor) -> Tensor:
        mixed = weights.transpose(-2, -1) @ grad
        if groups > 1:
            mixed = mixed.unflatten(-3, (-1, groups)).sum(-3)
        return mixed.sum_to_size(value_shape)

    return transpose


def _mha_value_transpose(bound: dict[str, Any], call: LayerCall) -> Callable[[Tensor], Tensor]:
    """``multi_head_attention_forward`` as an affine map of ``value`` (sequence-first): its transposed product.

    The map is ``out = W_o merge(A split(W_v value + b_v)) + b_o`` with the attention weights ``A``
    of every head fixed, so ``J^T g = W_v^T merge(A^T split(W_o^T g))``.
    """
    unsupported = [
        name
        for name in ("bias_k", "bias_v", "static_k", "static_v")
        if bound.get(name) is not None
    ] + [name for name in ("add_zero_attn",) if bound.get(name)]
    if unsupported or (bound["training"] and bound["dropout_p"]):
        raise NotImplementedError(
            f"AttentionValue does not support {', '.join(unsupported) or 'dropout in training mode'} "
            f"in {call.describe()}; map that call to None (plain gradient) or call model.eval()"
        )
    batched = bound["query"].dim() == 3
    heads = int(bound["num_heads"])
    embed = bound["query"].shape[-1]
    weights = _mha_weights(bound, heads)  # (batch * heads, target length, source length)
    if bound["use_separate_proj_weight"]:
        value_weight = bound["v_proj_weight"]
    else:
        value_weight = bound["in_proj_weight"][2 * embed :]
    out_weight = bound["out_proj_weight"]

    def transpose(grad: Tensor) -> Tensor:
        grads = grad if batched else grad.unsqueeze(1)
        length, batch = grads.shape[:2]
        per_head = (grads @ out_weight).reshape(length, batch * heads, -1).transpose(0, 1)
        mixed = weights.transpose(1, 2) @ per_head  # (batch * heads, source length, head width)
        merged = mixed.transpose(0, 1).reshape(-1, batch, embed)
        result = merged @ value_weight
        return result if batched else result.squeeze(1)

    return transpose


def _mha_weights(bound: dict[str, Any], heads: int) -> Tensor:
    """The attention weights of every head, ``(batch * heads, target length, source length)``.

    Without masks and with the packed input projection they are computed from the query and key
    projections alone, as ``multi_head_attention_forward`` does (scaled query, ``bmm``, softmax);
    otherwise torch's own function is run once more with ``need_weights=True``.
    """
    query, key = bound["query"], bound["key"]
    batched = query.dim() == 3
    plain = (
        bound["attn_mask"] is None
        and bound["key_padding_mask"] is None
        and not bound.get("is_causal", False)
        and not bound["use_separate_proj_weight"]
        and bound["in_proj_weight"] is not None
    )
    with torch.no_grad(), hooks_suspended():
        if not plain:
            arguments = {**bound, "need_weights": True, "average_attn_weights": False, "training": False}
            _, weights = torch.nn.functional.multi_head_attention_forward(**arguments)
            return weights.reshape(-1, *weights.shape[-2:])
        embed = query.shape[-1]
        width = embed // heads
        weight, bias = bound["in_proj_weight"], bound["in_proj_bias"]
        queries = torch.nn.functional.linear(query, weight[:embed], None if bias is None else bias[:embed])
        keys = torch.nn.functional.linear(key, weight[embed : 2 * embed], None if bias is None else bias[embed : 2 * embed])
        if not batched:
            queries, keys = queries.unsqueeze(1), keys.unsqueeze(1)
        queries = queries.reshape(queries.shape[0], -1, width).transpose(0, 1) * math.sqrt(1.0 / width)
        keys = keys.reshape(keys.shape[0], -1, width).transpose(0, 1)
        return torch.softmax(torch.bmm(queries, keys.transpose(1, 2)), dim=-1)


class _ElementwiseRule(Rule):
    """Rules for element-wise modules: one input of the output's shape."""

    def relevance(self, call: LayerCall, relevance: Tensor) -> Relevances:
        if len(call.inputs) != 1 or call.inputs[0].shape != relevance.shape:
            shapes = [tuple(tensor.shape) for tensor in call.inputs]
            raise ValueError(
                f"{type(self).__name__} needs an element-wise module with one input shaped like its "
                f"output; module {call.describe()} has inputs {shapes} and output "
                f"{tuple(relevance.shape)}"
            )
        return (self.elementwise(call, relevance),)

    def elementwise(self, call: LayerCall, relevance: Tensor) -> Tensor:
        raise NotImplementedError


class Pass(_ElementwiseRule):
    """Relevance passes unchanged through an element-wise module (activations)."""

    needs_inputs = False

    @property
    def passes_relevance(self) -> bool:  # type: ignore[override]
        """True unless a subclass changes what passes (then the general path runs)."""
        cls = type(self)
        return (
            cls.elementwise is Pass.elementwise
            and cls.relevance is _ElementwiseRule.relevance
            and cls.incoming is Rule.incoming
        )

    def elementwise(self, call: LayerCall, relevance: Tensor) -> Tensor:
        return relevance


class GuidedBackprop(_ElementwiseRule):
    """Guided backpropagation (Springenberg et al. 2015) for ReLU-like activations.

    The gradient through the activation, kept only where the incoming gradient is positive:
    for a ReLU, ``R_in = R.clamp(min=0) * (a > 0)``.
    """

    def elementwise(self, call: LayerCall, relevance: Tensor) -> Tensor:
        (gradient,) = call.ops.transpose(call.inputs, call.params(), relevance.clamp(min=0))
        assert gradient is not None
        return gradient


class Deconvnet(_ElementwiseRule):
    """DeconvNet (Zeiler and Fergus 2014) for ReLU activations: ``R_in = R.clamp(min=0)``."""

    needs_inputs = False

    def elementwise(self, call: LayerCall, relevance: Tensor) -> Tensor:
        return relevance.clamp(min=0)


__all__ = [
    "AlphaBeta",
    "AttentionValue",
    "Deconvnet",
    "Epsilon",
    "Flat",
    "Gamma",
    "GuidedBackprop",
    "LayerNormConstant",
    "Norm",
    "Pass",
    "Product",
    "Rule",
    "WSquare",
    "ZBox",
    "ZPlus",
    "divide",
    "relevance_filter",
    "stabilize",
]
