"""Named preset composites (zennit-compatible) and the registry that maps names to them.

Every preset accepts ``layer_map`` (and ``first_map`` where it has one) to prepend rules of your
own, ``zero_params``, ``canonizers`` and ``strict``; the LRP presets also take ``top_k``, the
relevance filter (:func:`lrpkit.rules.relevance_filter`) of every dense and convolutional rule,
e.g. ``EpsilonPlusFlat(top_k=0.05)`` keeps the largest 5% of the relevance values of each sample
before each such layer. Their ``stabilizer`` reaches every rule but the dense layers' epsilon,
also the rules of captured calls (products, normalisations, attention) through the default
canonizers (:func:`lrpkit.canonizers.default_canonizers`); with ``canonizers`` given, those
rules take their ``FunctionalCapture``'s.

Examples
--------
>>> from lrpkit import composites
>>> composite = composites.get("epsilon_plus_flat")
>>> type(composite).__name__
'EpsilonPlusFlat'
>>> sorted(composites.names())[:3]
['deconvnet', 'epsilon_alpha2_beta1', 'epsilon_alpha2_beta1_flat']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .. import captured, types
from ..canonizers import Canonizer, FunctionalCapture, MergeBatchNorm, default_canonizers
from ..rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ZBox, ZeroParams, ZPlus
from ..rules import Deconvnet as Deconvnet_rule
from ..rules import GuidedBackprop as GuidedBackprop_rule
from .maps import Composite, LayerMap, LayerMapComposite, SpecialFirstLayerMapComposite

_REGISTRY: dict[str, type[Composite]] = {}
C = TypeVar("C", bound=type[Composite])


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make a composite available as ``composites.get(name)``."""

    def decorate(cls: C) -> C:
        _REGISTRY[name] = cls
        return cls

    return decorate


def names() -> list[str]:
    """The registered preset names."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs: Any) -> Composite:
    """Build the preset registered as ``name`` with ``kwargs``.

    Raises
    ------
    KeyError
        If no preset has that name (the message lists the known ones).
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no composite named {name!r}; known: {', '.join(names())}") from None
    return cls(**kwargs)


#: Presets whose first-layer rule needs the bounds of the input domain.
_BOUNDED = {"epsilon_gamma_box"}


def get_for_input(name: str, x: torch.Tensor | Sequence[torch.Tensor]) -> Composite:
    """The preset ``name``; one that needs input bounds (``epsilon_gamma_box``) gets ``x``'s min and max."""
    if name not in _BOUNDED:
        return get(name)
    if isinstance(x, (tuple, list)):
        raise ValueError(
            f"composite {name!r} takes its z^B bounds from the input's minimum and maximum, and a model "
            "with several inputs has several; build it with the bounds of the input its first layer "
            "reads, e.g. composites.EpsilonGammaBox(low=0.0, high=1.0)"
        )
    if not x.is_floating_point():
        raise ValueError(
            f"composite {name!r} takes its z^B bounds from the input's minimum and maximum, which an input "
            f"of dtype {x.dtype} (token ids) does not give; build it with the range of the embedding "
            "vectors, e.g. composites.EpsilonGammaBox(low=-3.0, high=3.0), or choose another preset"
        )
    return get(name, low=float(x.min()), high=float(x.max()))


def layer_map_base(stabilizer: float = 1e-6) -> list[tuple[Any, Any]]:
    """The rules every preset shares: activations pass, sums, average pools and resampling split proportionally."""
    return [
        (types.Activation, Pass()),
        (types.Sum, Norm(stabilizer=stabilizer)),
        (types.AvgPool, Norm(stabilizer=stabilizer)),
        (types.Resample, Norm(stabilizer=stabilizer)),
        (types.BatchNorm, Pass()),
    ]


def _prepend(user_map: LayerMap | None) -> list[tuple[Any, Any]]:
    return list(user_map or [])


def _lrp_default(canonizers: Sequence[Canonizer] | None, stabilizer: float) -> list[Canonizer]:
    """``canonizers``, or the default ones with the preset's ``stabilizer`` for captured calls."""
    return default_canonizers(stabilizer) if canonizers is None else list(canonizers)


@register("epsilon_plus")
class EpsilonPlus(LayerMapComposite):
    """z+ on convolutions, epsilon on dense layers (Montavon et al. 2019, Kohlbrenner et al. 2020)."""

    def __init__(
        self,
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
        layer_map: LayerMap | None = None,
        zero_params: ZeroParams = None,
        top_k: float | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        layer_map = _prepend(layer_map) + layer_map_base(stabilizer) + [
            (types.Convolution, ZPlus(stabilizer=stabilizer, zero_params=zero_params, top_k=top_k)),
            (types.Linear, Epsilon(epsilon=epsilon, zero_params=zero_params, top_k=top_k)),
        ]
        super().__init__(layer_map, canonizers=_lrp_default(canonizers, stabilizer), strict=strict)


@register("epsilon_plus_flat")
class EpsilonPlusFlat(SpecialFirstLayerMapComposite):
    """Flat on the first layer, z+ on convolutions, epsilon on dense layers."""

    def __init__(
        self,
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
        layer_map: LayerMap | None = None,
        first_map: LayerMap | None = None,
        zero_params: ZeroParams = None,
        top_k: float | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        layer_map = _prepend(layer_map) + layer_map_base(stabilizer) + [
            (types.Convolution, ZPlus(stabilizer=stabilizer, zero_params=zero_params, top_k=top_k)),
            (types.Linear, Epsilon(epsilon=epsilon, zero_params=zero_params, top_k=top_k)),
        ]
        first_map = _prepend(first_map) + [(types.AnyLinear, Flat(stabilizer=stabilizer, zero_params=zero_params, top_k=top_k))]
        super().__init__(layer_map, first_map, canonizers=_lrp_default(canonizers, stabilizer), strict=strict)


@register("epsilon_gamma_box")
class EpsilonGammaBox(SpecialFirstLayerMapComposite):
    """z^B on the first convolution, gamma on the others, epsilon on dense layers.

    Parameters
    ----------
    low, high
        Bounds of the input domain for z^B (floats or tensors broadcastable to the input).
    """

    def __init__(
        self,
        low: float | torch.Tensor,
        high: float | torch.Tensor,
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        stabilizer: float = 1e-6,
        layer_map: LayerMap | None = None,
        first_map: LayerMap | None = None,
        zero_params: ZeroParams = None,
        top_k: float | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        layer_map = _prepend(layer_map) + layer_map_base(stabilizer) + [
            (types.Convolution, Gamma(gamma=gamma, stabilizer=stabilizer, zero_params=zero_params, top_k=top_k)),
            (types.Linear, Epsilon(epsilon=epsilon, zero_params=zero_params, top_k=top_k)),
        ]
        first_map = _prepend(first_map) + [
            (types.Convolution, ZBox(low=low, high=high, stabilizer=stabilizer, zero_params=zero_params, top_k=top_k))
        ]
        super().__init__(layer_map, first_map, canonizers=_lrp_default(canonizers, stabilizer), strict=strict)


@register("epsilon_alpha2_beta1")
class EpsilonAlpha2Beta1(LayerMapComposite):
    """alpha=2, beta=1 on convolutions, epsilon on dense layers."""

    def __init__(
        self,
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
        layer_map: LayerMap | None = None,
        zero_params: ZeroParams = None,
        top_k: float | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        layer_map = _prepend(layer_map) + layer_map_base(stabilizer) + [
            (types.Convolution, AlphaBeta(2.0, 1.0, stabilizer=stabilizer, zero_params=zero_params, top_k=top_k)),
            (types.Linear, Epsilon(epsilon=epsilon, zero_params=zero_params, top_k=top_k)),
        ]
        super().__init__(layer_map, canonizers=_lrp_default(canonizers, stabilizer), strict=strict)


@register("epsilon_alpha2_beta1_flat")
class EpsilonAlpha2Beta1Flat(SpecialFirstLayerMapComposite):
    """Flat on the first layer, alpha=2, beta=1 on convolutions, epsilon on dense layers."""

    def __init__(
        self,
        epsilon: float = 1e-6,
        stabilizer: float = 1e-6,
        layer_map: LayerMap | None = None,
        first_map: LayerMap | None = None,
        zero_params: ZeroParams = None,
        top_k: float | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        layer_map = _prepend(layer_map) + layer_map_base(stabilizer) + [
            (types.Convolution, AlphaBeta(2.0, 1.0, stabilizer=stabilizer, zero_params=zero_params, top_k=top_k)),
            (types.Linear, Epsilon(epsilon=epsilon, zero_params=zero_params, top_k=top_k)),
        ]
        first_map = _prepend(first_map) + [(types.AnyLinear, Flat(stabilizer=stabilizer, zero_params=zero_params, top_k=top_k))]
        super().__init__(layer_map, first_map, canonizers=_lrp_default(canonizers, stabilizer), strict=strict)


@register("excitation_backprop")
class ExcitationBackprop(LayerMapComposite):
    """Excitation backprop (Zhang et al. 2016): z+ on every dense and convolutional layer.

    A BatchNorm that no layer before it takes in (a pre-activation block's, as in DenseNet)
    passes relevance on unchanged (``Pass``), as in every other preset; zennit's composite gives
    it the plain gradient.
    """

    def __init__(
        self,
        stabilizer: float = 1e-6,
        layer_map: LayerMap | None = None,
        zero_params: ZeroParams = None,
        top_k: float | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        layer_map = _prepend(layer_map) + [
            (types.AvgPool, Norm(stabilizer=stabilizer)),
            (types.BatchNorm, Pass()),
            (types.AnyLinear, ZPlus(stabilizer=stabilizer, zero_params=zero_params, top_k=top_k)),
        ]
        super().__init__(layer_map, canonizers=_lrp_default(canonizers, stabilizer), strict=strict)


#: The ReLUs the gradient presets rectify: modules and captured ``F.relu`` calls.
_RELUS = (nn.ReLU, captured.ReLU)


def gradient_canonizers() -> list[Canonizer]:
    """Canonizers of the gradient presets: merge BatchNorm, capture calls but keep their gradient.

    Captured calls get no default rule (an addition stays a plain gradient); only the preset's
    own rule for ReLUs reaches captured ``F.relu`` calls.
    """
    return [MergeBatchNorm(), FunctionalCapture(rules=[(captured.CapturedOp, None)])]


@register("guided_backprop")
class GuidedBackprop(LayerMapComposite):
    """Guided backpropagation (Springenberg et al. 2015): rectified gradients through ReLUs."""

    warn_uncovered = False

    def __init__(
        self,
        layer_map: LayerMap | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        layer_map = _prepend(layer_map) + [(_RELUS, GuidedBackprop_rule())]
        super().__init__(layer_map, canonizers=_gradient_default(canonizers), strict=strict)


@register("deconvnet")
class Deconvnet(LayerMapComposite):
    """DeconvNet (Zeiler and Fergus 2014): ReLUs pass rectified gradients, ignoring the forward."""

    warn_uncovered = False

    def __init__(
        self,
        layer_map: LayerMap | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        layer_map = _prepend(layer_map) + [(_RELUS, Deconvnet_rule())]
        super().__init__(layer_map, canonizers=_gradient_default(canonizers), strict=strict)


def _gradient_default(canonizers: Sequence[Canonizer] | None) -> list[Canonizer]:
    return gradient_canonizers() if canonizers is None else list(canonizers)
