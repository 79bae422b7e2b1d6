"""Independent matrix-form reference implementation of the LRP rules (float64).

This module is the oracle the unit tests compare lrpkit against. It deliberately
shares no code with lrpkit (and does not use zennit): every rule is written from
its formula as a few lines of dense matrix algebra per sample.

For a linear-type layer (``Linear``, ``Conv*d``, ``ConvTranspose*d``) applied to one
sample of shape ``in_shape`` we build

* ``W``  -- the dense ``(n_out, n_in)`` matrix of the *bias-free* layer, obtained as the
  layer's Jacobian by applying it (bias set to zero) to the identity basis,
* ``b``  -- the bias expanded to every output position (zeros if the layer has none),
  obtained as the layer's output for an all-zero input,
* ``O``  -- the connectivity pattern: the Jacobian of the layer with all weights set
  to one (used by the Flat rule).

Every entry of ``W`` comes from exactly one kernel weight (or is structurally zero),
so the element-wise ``max(W, 0)``, ``min(W, 0)`` and ``W * W`` of the dense matrix equal
the dense matrices of the layer with clamped/squared weights; the tests check this.

Notation used below (per sample, flattened): ``a`` the layer input, ``R`` the relevance
arriving at the layer output, ``a+ = max(a, 0)``, ``a- = min(a, 0)``, same for ``W`` and
``b``; ``stab(v) = v + eps * sign(v)`` with ``sign(0) = +1``. The product ``W^T s`` of a
batch ``s`` of shape ``(B, n_out)`` is written ``s @ W`` (shape ``(B, n_in)``).

Every rule function returns a :class:`ReferenceResult`: the input relevance and the
conditioning ``|den| / sum|terms|`` of its "risky" denominators -- denominators that are
*not* sign-definite sums and can therefore come arbitrarily close to zero by cancellation
(positions where they do not matter are ``inf``). Tests redraw their random data until the
conditioning stays well away from zero, so that float rounding differences between two
correct implementations cannot explode (nor flip a sign gate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

DTYPE = torch.float64

__all__ = [
    "DenseLayer",
    "ReferenceResult",
    "dense_layer",
    "dense_linear_map",
    "jacobian_by_autograd",
    "stab",
    "epsilon",
    "zplus",
    "alpha_beta",
    "gamma",
    "zbox",
    "flat",
    "wsquare",
    "norm",
    "pass_through",
    "guided_backprop",
    "deconvnet",
    "reference_relevance",
    "relative_error",
    "zero_bias_requested",
]


# --------------------------------------------------------------------------------------
# dense matrices of a layer
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DenseLayer:
    """Dense per-sample form of a linear-type layer."""

    weight: Tensor  # (n_out, n_in): Jacobian of the bias-free layer
    bias: Tensor  # (n_out,): bias expanded to every output position (zeros if none)
    connectivity: Tensor  # (n_out, n_in): Jacobian of the layer with all weights one
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def n_in(self) -> int:
        return self.weight.shape[1]

    @property
    def n_out(self) -> int:
        return self.weight.shape[0]


def _identity_jacobian(linear_fn: Callable[[Tensor], Tensor], in_shape: Sequence[int]) -> tuple[Tensor, tuple[int, ...]]:
    """Dense matrix of a *linear* function by applying it to the identity basis."""
    n_in = math.prod(in_shape)
    basis = torch.eye(n_in, dtype=DTYPE).reshape(n_in, *in_shape)
    with torch.no_grad():
        out = linear_fn(basis)
    out_shape = tuple(out.shape[1:])
    return out.reshape(n_in, -1).T.contiguous(), out_shape


def _call_with(layer: torch.nn.Module, weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """Run ``layer`` with replaced weight (and bias, when the layer has one)."""
    params = {"weight": weight}
    if getattr(layer, "bias", None) is not None:
        params["bias"] = bias if bias is not None else torch.zeros_like(layer.bias)
    return torch.func.functional_call(layer, params, (x,))


def dense_layer(layer: torch.nn.Module, in_shape: Sequence[int]) -> DenseLayer:
    """Dense ``W``, expanded ``b`` and connectivity of ``layer`` for one sample of ``in_shape``.

    ``layer`` must hold float64 parameters and have a ``weight`` (and maybe a ``bias``).
    """
    in_shape = tuple(in_shape)
    weight = layer.weight.detach().to(DTYPE)
    W, out_shape = _identity_jacobian(lambda x: _call_with(layer, weight, None, x), in_shape)
    ones, _ = _identity_jacobian(lambda x: _call_with(layer, torch.ones_like(weight), None, x), in_shape)
    if getattr(layer, "bias", None) is not None:
        with torch.no_grad():
            zero_input = torch.zeros((1, *in_shape), dtype=DTYPE)
            b = _call_with(layer, torch.zeros_like(weight), layer.bias.detach().to(DTYPE), zero_input)
        b = b.reshape(-1).clone()
    else:
        b = torch.zeros(W.shape[0], dtype=DTYPE)
    return DenseLayer(weight=W, bias=b, connectivity=ones, in_shape=in_shape, out_shape=out_shape)


def dense_linear_map(module: torch.nn.Module, in_shape: Sequence[int]) -> tuple[Tensor, tuple[int, ...]]:
    """Dense matrix of a parameter-free linear module (e.g. average pooling)."""
    return _identity_jacobian(module, in_shape)


def jacobian_by_autograd(fn: Callable[[Tensor], Tensor], in_shape: Sequence[int]) -> Tensor:
    """Dense Jacobian of ``fn`` (one sample, no batch dim) by ``torch.func.jacrev`` -- a second,
    independent way to get ``W`` used to check :func:`dense_layer`."""
    x0 = torch.zeros(tuple(in_shape), dtype=DTYPE)
    jac = torch.func.jacrev(lambda v: fn(v.unsqueeze(0)).squeeze(0))(x0)
    n_in = math.prod(in_shape)
    return jac.reshape(-1, n_in)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
@dataclass
class ReferenceResult:
    relevance: Tensor  # (B, n_in) flattened, or reshaped to the input shape by reference_relevance
    # conditioning |den| / sum|terms| of each risky denominator, (B, n_out); inf = harmless
    risky_conditioning: list[Tensor] = field(default_factory=list)

    def min_conditioning(self) -> float:
        """Smallest ``|den| / sum|terms|`` over the risky denominators (``inf`` if none)."""
        values = [d.min().item() for d in self.risky_conditioning if d.numel()]
        return min(values, default=math.inf)


def stab(v: Tensor, eps: float) -> Tensor:
    """``v + eps * sign(v)`` with ``sign(0) = +1``."""
    return v + eps * torch.where(v >= 0, 1.0, -1.0).to(v.dtype)


def pos(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def neg(t: Tensor) -> Tensor:
    return t.clamp(max=0)


def zero_bias_requested(zero_params: str | Iterable[str] | None) -> bool:
    """Normalise zennit's ``zero_params`` argument; only ``'bias'`` is supported here."""
    if zero_params is None:
        names: tuple[str, ...] = ()
    elif isinstance(zero_params, str):
        names = (zero_params,)
    else:
        names = tuple(zero_params)
    unsupported = set(names) - {"bias"}
    if unsupported:
        raise NotImplementedError(f"reference supports zero_params='bias' only, got {sorted(unsupported)}")
    return "bias" in names


def _bias(layer: DenseLayer, zero_params) -> Tensor:
    return torch.zeros_like(layer.bias) if zero_bias_requested(zero_params) else layer.bias


def _masked(
    den: Tensor, mask: Tensor | None = None, magnitude: Tensor | None = None, terms: Tensor | None = None
) -> Tensor:
    """Conditioning of a denominator where it matters, ``inf`` elsewhere.

    Returns ``|den| / magnitude`` with ``magnitude`` the sum of the absolute values of the
    terms that add up to ``den`` (plus any value an implementation may reasonably add and
    subtract again, e.g. the real bias when it computes ``z - b``); rounding changes ``den`` by
    about ``1e-16 * magnitude``, so this ratio bounds the relative rounding error of ``R / den``
    (and decides whether the sign of ``den`` is reliable). ``mask`` selects where the
    denominator is used. Where every term is exactly zero (``terms == 0``, default
    ``magnitude``; e.g. an all-zero receptive field) every contribution through ``den`` is
    exactly zero whatever ``den`` is, so it is harmless and reported as ``inf``.
    """
    keep = torch.ones_like(den, dtype=torch.bool) if mask is None else mask.clone()
    if magnitude is None:
        magnitude = torch.ones_like(den)
    if terms is None:
        terms = magnitude
    keep &= terms != 0
    ratio = den.abs() / torch.where(magnitude != 0, magnitude, torch.ones_like(magnitude))
    return torch.where(keep, ratio, torch.full_like(den, math.inf))


def _vjp(layer: DenseLayer, s: Tensor, M: Tensor) -> Tensor:
    """``M^T s`` per sample, summing over the layer's connections only: outputs with no
    connection at all (e.g. odd positions of a dilated transposed conv) contribute nothing,
    even when their ``s`` is not finite (``0 / 0`` with a zero stabiliser)."""
    connected = layer.connectivity.sum(dim=1) != 0
    return torch.where(connected, s, torch.zeros_like(s)) @ M


def _magnitude(*pairs: tuple[Tensor, Tensor], bias: Tensor | None = None) -> Tensor:
    """``sum |x| @ |M|^T (+ |b|)`` over the (x, M) pairs: the size of the terms of a denominator."""
    total = sum(x.abs() @ M.abs().T for x, M in pairs)
    return total if bias is None else total + bias.abs()


# --------------------------------------------------------------------------------------
# rules on dense layers; a: (B, n_in), R: (B, n_out)
# --------------------------------------------------------------------------------------
def epsilon(layer: DenseLayer, a: Tensor, R: Tensor, epsilon: float = 1e-6, zero_params=None) -> ReferenceResult:
    """LRP-epsilon: ``z = W a + b``; ``R_in = a * W^T (R / stab_eps(z))``."""
    W, b = layer.weight, _bias(layer, zero_params)
    z = a @ W.T + b
    s = R / stab(z, epsilon)
    terms = _magnitude((a, W), bias=b)
    # an implementation may get the bias-free z as (real output) - b: budget |b_real| for it
    risky = _masked(z, magnitude=terms + layer.bias.abs(), terms=terms)
    return ReferenceResult(a * _vjp(layer, s, W), [risky])


def zplus(layer: DenseLayer, a: Tensor, R: Tensor, stabilizer: float = 1e-6, zero_params=None) -> ReferenceResult:
    """Generalised z+: ``z = W+ a+ + b+ + W- a-``; ``R_in = a+ W+^T s + a- W-^T s``."""
    W, b = layer.weight, _bias(layer, zero_params)
    Wp, Wn = pos(W), neg(W)
    ap, an = pos(a), neg(a)
    z = ap @ Wp.T + pos(b) + an @ Wn.T  # sign-definite (>= 0): not risky
    s = R / stab(z, stabilizer)
    return ReferenceResult(ap * _vjp(layer, s, Wp) + an * _vjp(layer, s, Wn))


def alpha_beta(
    layer: DenseLayer, a: Tensor, R: Tensor, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, zero_params=None
) -> ReferenceResult:
    """LRP-alpha-beta (generalised to signed inputs)."""
    W, b = layer.weight, _bias(layer, zero_params)
    Wp, Wn = pos(W), neg(W)
    ap, an = pos(a), neg(a)
    zp = ap @ Wp.T + pos(b) + an @ Wn.T  # >= 0
    zn = ap @ Wn.T + neg(b) + an @ Wp.T  # <= 0
    sp = R / stab(zp, stabilizer)
    sn = R / stab(zn, stabilizer)
    positive = ap * _vjp(layer, sp, Wp) + an * _vjp(layer, sp, Wn)
    negative = ap * _vjp(layer, sn, Wn) + an * _vjp(layer, sn, Wp)
    return ReferenceResult(alpha * positive - beta * negative)


def gamma(layer: DenseLayer, a: Tensor, R: Tensor, gamma: float = 0.25, stabilizer: float = 1e-6, zero_params=None) -> ReferenceResult:
    """Generalised LRP-gamma, gated by the sign of the real output ``z = W a + b``."""
    W = layer.weight
    z = a @ W.T + layer.bias  # real output, real bias, independent of zero_params
    b = _bias(layer, zero_params)
    Wp_, Wn_ = W + gamma * pos(W), W + gamma * neg(W)
    bp_, bn_ = b + gamma * pos(b), b + gamma * neg(b)
    ap, an = pos(a), neg(a)
    zpos = ap @ Wp_.T + bp_ + an @ Wn_.T
    zneg = ap @ Wn_.T + bn_ + an @ Wp_.T
    gp = (z > 0).to(DTYPE) * R / stab(zpos, stabilizer)
    gn = (z < 0).to(DTYPE) * R / stab(zneg, stabilizer)
    relevance = ap * _vjp(layer, gp, Wp_) + an * _vjp(layer, gp, Wn_) + ap * _vjp(layer, gn, Wn_) + an * _vjp(layer, gn, Wp_)
    risky = [
        _masked(z, magnitude=_magnitude((a, W), bias=layer.bias)),
        _masked(zpos, z > 0, _magnitude((ap, Wp_), (an, Wn_), bias=bp_)),
        _masked(zneg, z < 0, _magnitude((ap, Wn_), (an, Wp_), bias=bn_)),
    ]
    return ReferenceResult(relevance, risky)


def zbox(layer: DenseLayer, a: Tensor, R: Tensor, low: Tensor, high: Tensor, stabilizer: float = 1e-6, zero_params=None) -> ReferenceResult:
    """z^B: ``z = (W a + b) - (W+ l + b+) - (W- h + b-)``; ``R_in = a W^T s - l W+^T s - h W-^T s``.

    ``low``/``high`` are already broadcast to ``a``'s shape ``(B, n_in)``.
    """
    W, b = layer.weight, _bias(layer, zero_params)
    Wp, Wn = pos(W), neg(W)
    z = (a @ W.T + b) - (low @ Wp.T + pos(b)) - (high @ Wn.T + neg(b))
    s = R / stab(z, stabilizer)
    # the bias terms b - b+ - b- cancel exactly, so they are left out of the magnitude
    magnitude = _magnitude((a, W), (low, Wp), (high, Wn))
    return ReferenceResult(a * _vjp(layer, s, W) - low * _vjp(layer, s, Wp) - high * _vjp(layer, s, Wn), [_masked(z, magnitude=magnitude)])


def flat(layer: DenseLayer, a: Tensor, R: Tensor, stabilizer: float = 1e-6, zero_params=None) -> ReferenceResult:
    """Flat: weights one, bias zero, inputs one: ``z = O 1``; ``R_in = O^T (R / stab(z))``."""
    zero_bias_requested(zero_params)  # validate only: the bias is zero anyway
    O = layer.connectivity
    z = O.sum(dim=1).expand_as(R)
    s = R / stab(z, stabilizer)
    return ReferenceResult(_vjp(layer, s, O))


def wsquare(layer: DenseLayer, a: Tensor, R: Tensor, stabilizer: float = 1e-6, zero_params=None) -> ReferenceResult:
    """W^2: weights squared, bias zero, inputs one: ``z = (W*W) 1``; ``R_in = (W*W)^T s``."""
    zero_bias_requested(zero_params)
    W2 = layer.weight * layer.weight
    z = W2.sum(dim=1).expand_as(R)
    s = R / stab(z, stabilizer)
    return ReferenceResult(_vjp(layer, s, W2))


def norm(J: Tensor, a: Tensor, R: Tensor, stabilizer: float = 1e-6) -> ReferenceResult:
    """Norm for parameter-free linear maps with Jacobian ``J``: ``R_in = a J^T (R / stab(J a))``."""
    z = a @ J.T
    s = R / stab(z, stabilizer)
    return ReferenceResult(a * (s @ J), [_masked(z, magnitude=_magnitude((a, J)))])


def pass_through(a: Tensor, R: Tensor) -> Tensor:
    return R.clone()


def guided_backprop(a: Tensor, R: Tensor) -> Tensor:
    """Guided backprop through a ReLU: positive relevance where the input was positive."""
    return R.clamp(min=0) * (a > 0).to(R.dtype)


def deconvnet(a: Tensor, R: Tensor) -> Tensor:
    """Deconvnet through a ReLU: the ReLU applied to the relevance."""
    return R.clamp(min=0)


# --------------------------------------------------------------------------------------
# front door
# --------------------------------------------------------------------------------------
_LINEAR_RULES = {
    "Epsilon": epsilon,
    "ZPlus": zplus,
    "AlphaBeta": alpha_beta,
    "Gamma": gamma,
    "ZBox": zbox,
    "Flat": flat,
    "WSquare": wsquare,
}


def reference_relevance(
    rule: str,
    layer: torch.nn.Module,
    x: Tensor,
    relevance_out: Tensor,
    zero_params=None,
    dense: DenseLayer | None = None,
    **params,
) -> ReferenceResult:
    """Reference input relevance of ``rule`` (a rule class name) for ``layer`` at batch ``x``.

    ``relevance_out`` has the layer output's shape. The returned relevance has ``x``'s shape;
    the risky denominators are ``(B, n_out)``.
    """
    if rule not in _LINEAR_RULES:
        raise KeyError(rule)
    x = x.to(DTYPE)
    batch = x.shape[0]
    if dense is None:
        dense = dense_layer(layer, x.shape[1:])
    a = x.reshape(batch, -1)
    R = relevance_out.to(DTYPE).reshape(batch, -1)
    if R.shape[1] != dense.n_out:
        raise ValueError(f"relevance_out has {R.shape[1]} entries per sample, layer output has {dense.n_out}")
    if rule == "ZBox":
        params = dict(params)
        for key in ("low", "high"):
            bound = torch.as_tensor(params[key], dtype=DTYPE)
            params[key] = torch.broadcast_to(bound, x.shape).reshape(batch, -1)
    result = _LINEAR_RULES[rule](dense, a, R, zero_params=zero_params, **params)
    result.relevance = result.relevance.reshape(x.shape)
    return result


def relative_error(ours: Tensor, ref: Tensor) -> float:
    """``max|ours - ref| / max|ref|`` (float64)."""
    ours = ours.detach().to("cpu", DTYPE)
    ref = ref.detach().to("cpu", DTYPE)
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    if scale == 0.0:
        return diff
    return diff / scale
