"""Merge BatchNorm layers into the dense or convolutional layer that feeds them, reversibly.

In eval mode a BatchNorm is the affine map ``y = (x - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)`` per channel. When ``x`` is the output of a ``Linear`` or a
convolution (transposed ones included) ``x = W a + b`` and nothing else uses ``x``, the pair is
one affine layer with ``W' = W * s`` (per output channel) and ``b' = (b - mean) * s + beta``. LRP
rules are defined for that single layer, so merging is what makes them applicable to BatchNorm
networks.

:class:`MergeBatchNorm` finds the pairs by itself, from the graph the model actually executes
(one probe forward at the first call inside the context, cached per model afterwards);
:class:`NamedMergeBatchNorm` takes them by name. Both replace the BatchNorm by ``nn.Identity``
in its parent(s) (:class:`MergeBatchNorm` keeps a BatchNorm subclass with its own ``forward``,
such as timm's ``BatchNormAct2d``, and gives it the statistics of the identity, where the probe
shows that the forward normalizes first) and merge it into the layer in one of two ways: a large
layer (by default one with at least ``2**17`` weight elements) keeps its weight, and a forward
hook scales its output per channel, the rules applying that scale in their products (no copy of
the weight is made); a small one gets new merged ``Parameter`` objects, except one whose weight
a parametrization computes (``weight_norm``, ``spectral_norm``), which is always scaled.
``remove()`` puts the original objects back: parameters are never modified in place, so
``state_dict()`` is bitwise the same afterwards.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from lrpkit.canonizers import MergeBatchNorm
>>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval()
>>> x = torch.rand(1, 1, 5, 5)
>>> expected = model(x)
>>> (handle,) = MergeBatchNorm().apply(model)
>>> torch.allclose(model(x), expected, atol=1e-6), handle.pairs
(True, [('0', '1')])
>>> type(model[1]).__name__
'Identity'
>>> handle.remove()
>>> type(model[1]).__name__
'BatchNorm2d'
"""

from __future__ import annotations

import sys
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from ..ops import OutputScaling, hooks_are_suspended, hooks_suspended, set_output_scaling
from .base import CallbackHandle, Canonizer, Handle, undo_all

#: Layers a BatchNorm can be merged into.
MERGEABLE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)

Pair = tuple[str, str]
PairSpec = Sequence[tuple[str, str]]


# --------------------------------------------------------------------------------------------
# which modules qualify
# --------------------------------------------------------------------------------------------


def _frozen_batchnorm_type() -> type[nn.Module] | None:
    """``torchvision.ops.misc.FrozenBatchNorm2d`` if torchvision has been imported, else ``None``.

    A model holding a ``FrozenBatchNorm2d`` has imported it, so looking it up in ``sys.modules``
    finds every instance without importing (or requiring) torchvision.
    """
    misc = sys.modules.get("torchvision.ops.misc")
    frozen = getattr(misc, "FrozenBatchNorm2d", None)
    return frozen if isinstance(frozen, type) else None


def _norm_types() -> tuple[type[nn.Module], ...]:
    """The BatchNorm types that can be merged."""
    frozen = _frozen_batchnorm_type()
    return (_BatchNorm,) if frozen is None else (_BatchNorm, frozen)


def _standard_forwards() -> tuple[Any, ...]:
    """``forward`` functions whose eval-mode computation is ``(x - mean) * s + beta``."""
    forwards: list[Any] = [_BatchNorm.forward, nn.SyncBatchNorm.forward]
    frozen = _frozen_batchnorm_type()
    if frozen is not None:
        forwards.append(frozen.forward)
    return tuple(forwards)


def _layer_type_problem(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot take a BatchNorm merge because of what it is, or ``None``."""
    base = next((cls for cls in MERGEABLE_LAYERS if isinstance(layer, cls)), None)
    if base is None:
        return f"is a {type(layer).__name__}, not one of {', '.join(c.__name__ for c in MERGEABLE_LAYERS)}"
    conv_forward = getattr(base, "_conv_forward", None)  # standard convolutions' forward calls it
    overridden = type(layer).forward is not base.forward or (
        conv_forward is not None and type(layer)._conv_forward is not conv_forward  # type: ignore[attr-defined]
    )
    if overridden:
        return f"is a {type(layer).__name__} with its own forward (a merged weight may not act linearly)"
    weight = layer._parameters.get("weight")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "is a lazy layer that is not initialized yet"
    if not isinstance(weight, nn.Parameter) and not _weight_is_computed(layer):
        return "has no weight (neither a Parameter nor computed by a parametrization)"
    return None


def _weight_is_computed(layer: nn.Module) -> bool:
    """Whether ``layer.weight`` is computed from other Parameters rather than one of its own.

    ``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ``spectral_norm``,
    ``orthogonal``) computes it at each access, the older ``torch.nn.utils.weight_norm`` before
    each call. Such a layer cannot take merged Parameters; a BatchNorm after it is merged by
    scaling its output (:func:`_install_scaling`).
    """
    if isinstance(layer._parameters.get("weight"), nn.Parameter):
        return False
    return parametrize.is_parametrized(layer, "weight") or isinstance(vars(layer).get("weight"), Tensor)


def _output_channels(layer: nn.Module) -> int:
    """The number of output channels (features) of a mergeable layer."""
    return int(layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels)  # type: ignore[arg-type]


def _has_standard_forward(norm: nn.Module) -> bool:
    """Whether ``norm``'s forward is torch's (or torchvision's) own BatchNorm forward."""
    return type(norm).forward in _standard_forwards()


def _norm_type_problem(norm: nn.Module, own_forward: bool = True) -> str | None:
    """Why ``norm`` cannot be merged because of what it is, or ``None``.

    ``own_forward``: accept a BatchNorm subclass with its own ``forward`` (the probe of
    :func:`find_batchnorm_pairs` then checks that it applies the BatchNorm first).
    """
    if not isinstance(norm, _norm_types()):
        return f"is a {type(norm).__name__}, not a BatchNorm"
    if isinstance(norm, nn.modules.lazy.LazyModuleMixin) and norm.has_uninitialized_params():
        return "is a lazy BatchNorm that is not initialized yet"
    if not (_has_standard_forward(norm) or (own_forward and isinstance(norm, _BatchNorm))):
        return (
            f"is a {type(norm).__name__} with its own forward (MergeBatchNorm merges one whose "
            "forward it can check applies the BatchNorm first)"
        )
    return None


def _pair_state_problem(layer: nn.Module, norm: nn.Module) -> str | None:
    """Why merging ``norm`` into ``layer`` would change the result in their current state, or ``None``."""
    if isinstance(norm, _BatchNorm) and norm.training:
        return "the BatchNorm is in training mode (it normalizes with batch statistics)"
    mean = getattr(norm, "running_mean", None)
    if mean is None or getattr(norm, "running_var", None) is None:
        return "the BatchNorm has no running statistics (track_running_stats=False)"
    channels = _output_channels(layer)
    if mean.numel() != channels:
        return f"the layer has {channels} output channels but the BatchNorm normalizes {mean.numel()}"
    return None


def _merge_problem(layer: nn.Module, norm: nn.Module) -> str | None:
    """Any reason not to merge ``norm`` into ``layer``, or ``None``."""
    return _layer_type_problem(layer) or _norm_type_problem(norm) or _pair_state_problem(layer, norm)


def check_eval(model: nn.Module, who: str) -> None:
    """Refuse a model that has a BatchNorm in training mode.

    Raises
    ------
    ValueError
        Naming the first BatchNorm that is in training mode.
    """
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.training:
            raise ValueError(
                f"{who}: module '{name or type(model).__name__}' ({type(module).__name__}) is in "
                "training mode; call model.eval() first"
            )


# --------------------------------------------------------------------------------------------
# the merge itself: pure functions, then reversible installation
# --------------------------------------------------------------------------------------------


def batchnorm_affine(norm: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """``(mean, scale, beta)`` of an eval-mode BatchNorm, detached.

    Returns
    -------
    mean, scale, beta
        ``y = (x - mean) * scale + beta`` per channel with ``scale = gamma / sqrt(var + eps)``;
        ``gamma = 1`` and ``beta = 0`` for a BatchNorm without affine parameters.
    """
    mean = norm.running_mean.detach()  # type: ignore[union-attr]
    std = torch.sqrt(norm.running_var.detach() + norm.eps)  # type: ignore[operator]
    gamma = norm.weight.detach() if norm.weight is not None else torch.ones_like(mean)  # type: ignore[union-attr]
    beta = norm.bias.detach() if norm.bias is not None else torch.zeros_like(mean)  # type: ignore[union-attr]
    return mean, gamma / std, beta


def merged_parameters(weight: Tensor, bias: Tensor | None, norm: nn.Module, transposed_groups: int = 0) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``layer -> norm`` as one layer (new tensors; nothing is modified).

    Parameters
    ----------
    weight
        The layer's weight, output channels first (``Linear``: ``(out, in)``; convolution:
        ``(out, in / groups, *kernel)``), or a transposed convolution's ``(in, out / groups,
        *kernel)``.
    bias
        The layer's bias, or ``None`` (treated as zero).
    norm
        The eval-mode BatchNorm after the layer.
    transposed_groups
        The ``groups`` of a transposed convolution; ``0`` for the other layers.

    Returns
    -------
    weight, bias
        ``w * s`` per output channel and ``(b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``,
        in the weight's dtype.
    """
    with torch.no_grad():
        mean, scale, beta = batchnorm_affine(norm)
        weight = weight.detach()
        bias = torch.zeros_like(mean) if bias is None else bias.detach()
        new_weight = weight * weight_scale(scale, weight.shape, transposed_groups)
        new_bias = (bias - mean) * scale + beta
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def weight_scale(scale: Tensor, weight_shape: Sequence[int], transposed_groups: int = 0) -> Tensor:
    """``scale`` (one factor per output channel) shaped to multiply a weight of ``weight_shape``.

    Output channels come first in the weight of a ``Linear`` or a standard convolution; a
    transposed convolution with ``transposed_groups`` groups holds ``out / groups`` of them in its
    second dimension, the same for each of the ``in / groups`` input channels of a group.
    """
    ones = [1] * (len(weight_shape) - 2)
    if not transposed_groups:
        return scale.reshape(-1, 1, *ones)
    inputs, per_group = weight_shape[0], weight_shape[1]
    by_group = scale.reshape(transposed_groups, 1, per_group)
    return by_group.expand(-1, inputs // transposed_groups, -1).reshape(inputs, per_group, *ones)


def _transposed_groups(layer: nn.Module) -> int:
    """The ``groups`` of a transposed convolution, ``0`` for the other layers."""
    return int(layer.groups) if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 0  # type: ignore[arg-type]


def _install_parameters(layer: nn.Module, weight: nn.Parameter, bias: nn.Parameter) -> Handle:
    """Put the merged ``weight``/``bias`` Parameters on ``layer``; the handle puts the originals back.

    Written straight into ``layer._parameters`` (what ``nn.Module.__setattr__`` ends with, without
    its checks, which cost more than the rest of a merge): both names already hold Parameters, or
    ``bias`` holds ``None``.
    """
    parameters = layer._parameters
    old_weight, old_bias = parameters["weight"], parameters.get("bias")
    parameters["weight"], parameters["bias"] = weight, bias

    def undo() -> None:
        parameters["weight"], parameters["bias"] = old_weight, old_bias

    return CallbackHandle(undo)


Locations = dict[int, list[tuple[nn.Module, str]]]


def _locations(model: nn.Module) -> Locations:
    """For every module under ``model`` (by ``id``): each ``(parent, attribute)`` that holds it."""
    found: Locations = defaultdict(list)
    for parent in model.modules():
        for name, module in parent._modules.items():
            if module is not None:
                found[id(module)].append((parent, name))
    return found


def _swap_for_identity(model: nn.Module, norm: nn.Module, locations: list[tuple[nn.Module, str]]) -> Handle:
    """Replace ``norm`` by ``nn.Identity()`` at each of its ``locations`` under ``model``.

    A forward hook on ``norm`` also makes it an identity for callers that reach it some other way
    (a reference kept outside the module tree); the handle undoes both.
    """
    if not locations:
        raise ValueError(
            f"the BatchNorm {type(norm).__name__} is not a submodule of {type(model).__name__} "
            "(the root module itself cannot be replaced)"
        )
    identity = _IDENTITIES.get(norm)
    if identity is None:
        identity = _IDENTITIES[norm] = nn.Identity()
    guard = norm.register_forward_hook(_pass_input)
    done: list[tuple[nn.Module, str]] = []

    def undo() -> None:
        for parent, name in reversed(done):
            parent._modules[name] = norm
        guard.remove()

    try:  # straight into ``_modules``, as in _install_parameters: the names already hold modules
        for parent, name in locations:
            parent._modules[name] = identity
            done.append((parent, name))
    except BaseException:
        undo()
        raise
    return CallbackHandle(undo)


def _neutralize(norm: nn.Module) -> Handle:
    """Give ``norm`` the statistics of the identity; the handle puts its own objects back.

    For a BatchNorm subclass with its own ``forward`` (timm's ``BatchNormAct2d`` applies its
    activation inside), which cannot be replaced by ``nn.Identity``: with mean 0, variance 1,
    ``eps`` 0, weight 1 and bias 0 its normalization returns its input exactly (``x * 1 + 0``),
    and the rest of its forward runs on the merged layer's output. New tensors are installed in
    ``_parameters`` and ``_buffers``; the originals are never written to.
    """
    parameters, buffers = norm._parameters, norm._buffers
    saved = [(table, name, table[name]) for table in (parameters, buffers) for name in list(table)]
    eps = norm.eps
    mean = buffers["running_mean"]
    assert mean is not None  # _pair_state_problem: it has running statistics
    identity = {"weight": torch.ones_like(mean), "bias": torch.zeros_like(mean)}
    for name, value in identity.items():
        if parameters.get(name) is not None:
            parameters[name] = nn.Parameter(value, requires_grad=False)
    buffers["running_mean"], buffers["running_var"] = torch.zeros_like(mean), torch.ones_like(mean)
    norm.eps = 0.0

    def undo() -> None:
        for table, name, value in saved:
            table[name] = value
        norm.eps = eps

    return CallbackHandle(undo)


#: The ``nn.Identity`` that stands in for each merged BatchNorm (one per BatchNorm, reused).
_IDENTITIES: "weakref.WeakKeyDictionary[nn.Module, nn.Identity]" = weakref.WeakKeyDictionary()


def _pass_input(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    """Forward hook: a merged BatchNorm returns its input unchanged."""
    return args[0]


class MergeHandle:
    """Undoes one merge: original Parameters and BatchNorm modules back in place.

    Attributes
    ----------
    pairs
        ``(layer_name, batchnorm_name)`` of every merged pair, in execution order.
    """

    def __init__(self, pairs: list[Pair], steps: list[Handle]) -> None:
        self.pairs = pairs
        self._steps = steps

    def remove(self) -> None:
        steps, self._steps = self._steps, []
        undo_all(steps)


def merge_pairs(
    model: nn.Module,
    pairs: Sequence[tuple[str, nn.Module, str, nn.Module]],
    keep_merged: bool = True,
    virtual_from: int | None = None,
) -> MergeHandle:
    """Merge each ``(layer_name, layer, norm_name, norm)``; on any error nothing stays changed.

    All new parameters are computed before anything is installed. A BatchNorm may follow several
    layers (it is called once after each); each layer takes exactly one BatchNorm. A layer whose
    weight has at least ``virtual_from`` elements (never, if ``None``) and whose BatchNorm scale
    is ``>= 0`` everywhere is merged without a new weight (:func:`_install_scaling`); the others
    get merged Parameters, which with ``keep_merged`` are kept for later merges (see
    :func:`_merged_for`).
    """
    plans = [_plan(layer, norm, keep_merged, virtual_from) for _, layer, _, norm in pairs]
    steps: list[Handle] = []
    try:
        for install in plans:
            steps.append(install())
        norms = list({id(norm): norm for _, _, _, norm in pairs}.values())
        locations = _locations(model)
        for norm in norms:
            if _has_standard_forward(norm):
                steps.append(_swap_for_identity(model, norm, locations.get(id(norm), [])))
            else:
                steps.append(_neutralize(norm))
    except BaseException:
        undo_all(steps)
        raise
    return MergeHandle([(layer_name, norm_name) for layer_name, _, norm_name, _ in pairs], steps)


#: The default ``virtual_from``: weights of at least this many elements (512 KiB in float32) are
#: merged without a copy. Those hold nearly all of a deep network's weights (about 97 % of
#: ResNet50's convolution weights), while the smaller, early layers have the largest outputs,
#: where applying the scale to outputs and output gradients costs the most time.
VIRTUAL_FROM = 2**17


def _plan(layer: nn.Module, norm: nn.Module, keep: bool, virtual_from: int | None) -> Callable[[], Handle]:
    """How ``norm`` will be merged into ``layer``: everything computed, nothing installed yet.

    A layer whose weight is computed at each call is always merged by scaling its output, with
    negative scales too (the rules then build the merged weight when they need it).
    """
    computed = _weight_is_computed(layer)
    weight = layer._parameters.get("weight")
    virtual = computed or (virtual_from is not None and weight is not None and weight.numel() >= virtual_from)
    scaling = _scaling_for(layer, norm) if virtual else None
    if scaling is not None and (scaling.nonnegative or computed):
        return lambda: _install_scaling(layer, scaling)
    weight, bias = _merged_for(layer, norm, keep)
    return lambda: _install_parameters(layer, weight, bias)


def _install_scaling(layer: nn.Module, scaling: OutputScaling) -> Handle:
    """Merge by scaling ``layer``'s output: ``z * scale + shift`` by a forward hook, no new weight.

    The hook runs before every other forward hook of the layer (lrpkit's rule hooks included),
    so they see the merged layer's output; :mod:`lrpkit.ops` knows the scaling, so the rules'
    products use ``W`` and the scale instead of a merged copy of ``W``. The layer's Parameters
    stay as they are.
    """
    hook = layer.register_forward_hook(_ScaleOutput(scaling), prepend=True)
    set_output_scaling(layer, scaling)

    def undo() -> None:
        set_output_scaling(layer, None)
        hook.remove()

    return CallbackHandle(undo)


class _ScaleOutput:
    """Forward hook of a layer merged by :func:`_install_scaling`: the BatchNorm's affine map.

    It stands aside while a rule re-runs the layer itself (with the merged parameters).
    """

    #: One of lrpkit's hooks; the ops account for it (``OutputScaling.shift`` is the summand).
    lrpkit_hook = True

    def __init__(self, scaling: OutputScaling) -> None:
        self.scaling = scaling

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if hooks_are_suspended():
            return None
        # in place (autograd records it; nothing saved the layer's fresh output): a broadcasting
        # ``addcmul`` into a new tensor takes about three times as long on the CPU. Part of the
        # layer, so out of FunctionalCapture's sight (it writes element-wise in-place calls back)
        with torch._C.DisableTorchFunction():
            return output.mul_(self.scaling.scale).add_(self.scaling.shift)


def _scaling_for(layer: nn.Module, norm: nn.Module) -> OutputScaling:
    """The :class:`OutputScaling` of ``layer -> norm``.

    Cached per layer until any tensor it was computed from is replaced or changed in place, or
    ``eps`` changes (it holds three numbers per channel).
    """
    weights = _weight_sources(layer)
    bias = layer._parameters.get("bias")
    sources = (*weights, bias, norm.running_mean, norm.running_var, norm.weight, norm.bias)
    cached = _SCALINGS.get(layer)
    if cached is not None and cached[1] == norm.eps and _unchanged(cached[0], sources):
        return cached[2]
    dtype = weights[0].dtype
    with torch.no_grad():
        mean, scale, beta = batchnorm_affine(norm)
        scale = scale.to(dtype)
        shift = (beta - mean * scale).to(dtype)
        merged_bias = shift if bias is None else torch.addcmul(shift, bias.detach(), scale)
    channel_dims = len(layer.kernel_size) if isinstance(layer, nn.modules.conv._ConvNd) else 0  # type: ignore[arg-type]
    own = layer._parameters.get("weight")
    shape = own.shape if own is not None else layer.weight.shape  # a computed weight: computed once here
    scale_of_weight = weight_scale(scale, shape, _transposed_groups(layer))
    scaling = OutputScaling(scale, shift, merged_bias, channel_dims, scale_of_weight)
    _SCALINGS[layer] = (_stamp(sources), float(norm.eps), scaling)
    return scaling


def _weight_sources(layer: nn.Module) -> tuple[Tensor, ...]:
    """The layer's weight Parameter, or the Parameters its computed weight is made of."""
    weight = layer._parameters.get("weight")
    if weight is not None:
        return (weight,)
    return tuple(param for name, param in layer.named_parameters() if name != "bias")


_SCALINGS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[Any, int], ...], float, OutputScaling]]" = (
    weakref.WeakKeyDictionary()
)


def _merged_for(layer: nn.Module, norm: nn.Module, keep: bool = True) -> tuple[nn.Parameter, nn.Parameter]:
    """The merged weight and bias Parameters of ``layer -> norm``, computed once per state of both.

    With ``keep`` the result is cached per layer (as long as the layer lives, or until
    :func:`release_merged`) until any tensor it was computed from (or the result itself) is
    replaced or changed in place (``_version``), or ``eps`` changes: later contexts then merge
    without recomputing, which saves a pass over every merged weight but keeps a copy of them.
    Without ``keep`` nothing is cached (and a cached copy is dropped). The Parameters take the
    ``requires_grad`` of the layer's own; cached ones are not reused once they hold a ``.grad``.
    """
    weight = layer._parameters["weight"]
    assert weight is not None
    bias = layer._parameters.get("bias")
    sources = (weight, bias, norm.running_mean, norm.running_var, norm.weight, norm.bias)
    requires_grad = (weight.requires_grad, (bias if bias is not None else weight).requires_grad)
    if not keep:
        _MERGED.pop(layer, None)
    cached = _MERGED.get(layer)
    if cached is None or cached.eps != norm.eps or not _unchanged(cached.stamp, (*sources, cached.weight, cached.bias)):
        merged_weight, merged_bias = merged_parameters(weight, bias, norm, _transposed_groups(layer))
        cached = _Merged(_stamp((*sources, merged_weight, merged_bias)), float(norm.eps), merged_weight, merged_bias)
        if keep:
            _MERGED[layer] = cached
    return cached.parameters(requires_grad)


def release_merged(model: nn.Module | None = None) -> None:
    """Drop the merged parameters kept for the layers of ``model`` (for every layer if ``None``).

    The memory of one copy of each merged layer's weight goes back (once no context uses them);
    the next merge computes them again.
    """
    if model is None:
        _MERGED.clear()
        _SCALINGS.clear()
        return
    for module in model.modules():
        _MERGED.pop(module, None)
        _SCALINGS.pop(module, None)


@dataclass
class _Merged:
    """Cached merged parameters and a stamp of every tensor the merge read or produced."""

    stamp: tuple[tuple[Any, int], ...]
    eps: float
    weight: Tensor
    bias: Tensor
    installed: tuple[nn.Parameter, nn.Parameter] | None = None

    def parameters(self, requires_grad: tuple[bool, bool]) -> tuple[nn.Parameter, nn.Parameter]:
        """``weight`` and ``bias`` as Parameters (made once; again if the flags differ or a grad was set)."""
        installed = self.installed
        if (
            installed is None
            or (installed[0].requires_grad, installed[1].requires_grad) != requires_grad
            or installed[0].grad is not None
            or installed[1].grad is not None
        ):
            installed = self.installed = (
                nn.Parameter(self.weight, requires_grad=requires_grad[0]),
                nn.Parameter(self.bias, requires_grad=requires_grad[1]),
            )
        return installed


def _stamp(tensors: Sequence[Tensor | None]) -> tuple[tuple[Any, int], ...]:
    """A weak reference and the in-place version of each tensor (``None`` kept as is)."""
    return tuple((None, 0) if tensor is None else (weakref.ref(tensor), tensor._version) for tensor in tensors)


def _unchanged(stamp: tuple[tuple[Any, int], ...], tensors: Sequence[Tensor | None]) -> bool:
    """Whether ``tensors`` are the very tensors of ``stamp``, none changed in place since."""
    return len(stamp) == len(tensors) and all(
        (reference is None and tensor is None)
        or (reference is not None and reference() is tensor and tensor is not None and tensor._version == version)
        for (reference, version), tensor in zip(stamp, tensors)
    )


_MERGED: "weakref.WeakKeyDictionary[nn.Module, _Merged]" = weakref.WeakKeyDictionary()


def _resolve(
    model: nn.Module, pairs: Sequence[Pair], modules: dict[str, nn.Module] | None = None
) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """``(name, module)`` pairs for names; ``KeyError`` when a name does not exist.

    ``modules``: ``model``'s modules by name, if already at hand.
    """
    if modules is None:
        modules = dict(model.named_modules(remove_duplicate=False))

    def submodule(name: str) -> nn.Module:
        try:
            return modules[name]
        except KeyError:
            raise KeyError(f"{type(model).__name__} has no submodule named {name!r}") from None

    return [(layer_name, submodule(layer_name), norm_name, submodule(norm_name)) for layer_name, norm_name in pairs]


# --------------------------------------------------------------------------------------------
# finding pairs: one probe forward that records the executed graph
# --------------------------------------------------------------------------------------------


@dataclass
class _Output:
    """One output tensor of a candidate layer and everything that used it."""

    layer: nn.Module
    tensor: Tensor  # kept so that its id() stays unique for the whole probe
    users: list[Union[nn.Module, None]] = field(default_factory=list)


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in ``value`` (nested tuples, lists and dict values)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _has_tensor(value: Any) -> bool:
    return next(_tensors(value), None) is not None


class _Recorder:
    """What a probe forward saw: candidate layer outputs, their users, what each BatchNorm consumed."""

    def __init__(self) -> None:
        self.outputs: dict[int, _Output] = {}
        self.layer_outputs: dict[nn.Module, list[int]] = defaultdict(list)
        self.consumed: dict[nn.Module, list[int | None]] = defaultdict(list)
        self.active_norms: list[nn.Module] = []
        self.unfit: set[nn.Module] = set()

    def layer_hook(self, layer: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Forward hook on a candidate layer: remember its output (channels must be dim 1)."""
        expected = 2 if isinstance(layer, nn.Linear) else len(layer.kernel_size) + 2  # type: ignore[arg-type]
        if not isinstance(output, Tensor) or output.ndim != expected or id(output) in self.outputs:
            self.unfit.add(layer)
            return
        self.outputs[id(output)] = _Output(layer, output)
        self.layer_outputs[layer].append(id(output))

    def norm_pre_hook(self, norm: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook on a BatchNorm: remember the tensor it consumes."""
        self.active_norms.append(norm)
        if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
            self.consumed[norm].append(id(args[0]))
        else:
            self.unfit.add(norm)

    def norm_hook(self, norm: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """Forward hook on a BatchNorm (always called): it is no longer running."""
        if self.active_norms and self.active_norms[-1] is norm:
            self.active_norms.pop()

    def note_use(self, value: Any) -> None:
        """Record one use of every recorded tensor in ``value`` by the innermost running BatchNorm."""
        user = self.active_norms[-1] if self.active_norms else None
        for tensor in _tensors(value):
            record = self.outputs.get(id(tensor))
            if record is not None:
                record.users.append(user)

    def inputs_of(self, norm: nn.Module) -> list[Tensor]:
        """The tensors ``norm`` consumed (outputs of candidate layers)."""
        return [self.outputs[key].tensor for key in self.consumed[norm] if key in self.outputs]

    def groups(self) -> list[tuple[list[nn.Module], nn.Module]]:
        """``(layers, norm)``: every call of ``norm`` consumed an output of ``layers``, which had no other use."""
        found = []
        for norm, consumed in self.consumed.items():
            layers = self._feeding_layers(norm, consumed)
            if layers:
                found.append((layers, norm))
        return found

    def _feeding_layers(self, norm: nn.Module, consumed: list[int | None]) -> list[nn.Module]:
        if norm in self.unfit or any(key not in self.outputs for key in consumed):
            return []
        feeding = [self.outputs[key].layer for key in consumed if key is not None]
        layers = list({id(layer): layer for layer in feeding}.values())
        taken = set(consumed)
        for layer in layers:
            keys = self.layer_outputs[layer]
            if layer in self.unfit or any(key not in taken or self.outputs[key].users != [norm] for key in keys):
                return []
        return layers


class _UseCounter(TorchFunctionMode):
    """Counts, per torch function call that returns a tensor, the recorded tensors among its arguments.

    While ``__torch_function__`` runs, torch disables this mode, so calls made inside ``func`` (an
    ``F.batch_norm`` calling ``torch.batch_norm``) are not seen: only the outermost call counts.
    The depth counter keeps that true should anything re-enter the mode.
    """

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder
        self.depth = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.depth += 1
        try:
            result = func(*args, **kwargs)
        finally:
            self.depth -= 1
        if self.depth == 0 and _has_tensor(result):  # shape queries (.size(), .shape) do not count
            self.recorder.note_use((args, kwargs))
        return result


def _hook_candidates(model: nn.Module, recorder: _Recorder) -> list[RemovableHandle]:
    """Attach the recorder's hooks to every mergeable layer and BatchNorm of ``model``."""
    handles: list[RemovableHandle] = []
    try:
        for module in model.modules():
            if _layer_type_problem(module) is None:
                # first of the layer's hooks: a later hook that reads the output is a use
                handles.append(module.register_forward_hook(recorder.layer_hook, prepend=True))
            elif _norm_type_problem(module) is None:
                # last pre-hook (sees what the BatchNorm itself gets), first post-hook: the norm is
                # "running" exactly while its own forward runs
                handles.append(module.register_forward_pre_hook(recorder.norm_pre_hook, with_kwargs=True))
                handles.append(
                    module.register_forward_hook(
                        recorder.norm_hook, with_kwargs=True, always_call=True, prepend=True
                    )
                )
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def _cloned(value: Any) -> Any:
    """``value`` with every tensor cloned (the probe must not change the real inputs in place)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_cloned(item) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_cloned(item) for item in value)
    if isinstance(value, dict):
        return type(value)((key, _cloned(item)) for key, item in value.items())
    return value


def find_batchnorm_pairs(model: nn.Module, *args: Any, **kwargs: Any) -> list[Pair]:
    """Run ``model(*args, **kwargs)`` once and return the mergeable ``(layer, batchnorm)`` names.

    The forward runs under ``torch.no_grad()`` with lrpkit's hooks suspended, on clones of the
    inputs. A pair qualifies when every output of the layer was used by exactly one torch function
    call, inside the BatchNorm, which consumed it as its input; and every call of the BatchNorm
    consumed such an output. Pairs are listed in execution order of the BatchNorms.

    Parameters
    ----------
    model
        The model (in eval mode).
    *args, **kwargs
        Inputs of one forward call.
    """
    names = {module: name for name, module in model.named_modules()}
    recorder = _Recorder()
    handles = _hook_candidates(model, recorder)
    try:
        with torch.no_grad(), hooks_suspended(), _UseCounter(recorder):
            result = model(*_cloned(args), **_cloned(kwargs))
        recorder.active_norms.clear()
        recorder.note_use(result)  # a layer output returned by the model has a use outside
        groups = recorder.groups()
    finally:
        for handle in handles:
            handle.remove()
    mergeable = [
        (layers, norm)
        for layers, norm in groups
        if norm in names and norm is not model and all(_merge_problem(layer, norm) is None for layer in layers)
    ]
    return [
        (names[layer], names[norm])
        for layers, norm in mergeable
        if _has_standard_forward(norm) or all(_applies_batchnorm_first(norm, x) for x in recorder.inputs_of(norm))
        for layer in layers
    ]


def _applies_batchnorm_first(norm: nn.Module, x: Tensor) -> bool:
    """Whether the own ``forward`` of ``norm`` normalizes ``x`` first and then works on the result.

    Checked on the probe's input ``x``: ``norm.forward(x)`` must equal ``norm.forward`` with
    identity statistics (:func:`_neutralize`) applied to the plain BatchNorm of ``x``, which is
    what the model computes once the BatchNorm is merged into the layer before it. timm's
    ``BatchNormAct2d`` (normalization, then dropout and activation) passes; a forward that also
    uses ``x`` itself, or applies something before normalizing, does not.
    """
    with torch.no_grad(), hooks_suspended():
        expected = norm.forward(x.clone())
        normalized = F.batch_norm(
            x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps  # type: ignore[arg-type]
        )
        handle = _neutralize(norm)
        try:
            result = norm.forward(normalized)
        finally:
            handle.remove()
    if not (isinstance(expected, Tensor) and isinstance(result, Tensor) and expected.shape == result.shape):
        return False
    tolerance = 8 * torch.finfo(x.dtype).eps
    return torch.allclose(result, expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))


# --------------------------------------------------------------------------------------------
# canonizers
# --------------------------------------------------------------------------------------------


@dataclass
class _CacheEntry:
    """Pairs found for a model, valid while its module tree is the same."""

    signature: list[tuple[str, "weakref.ReferenceType[nn.Module]"]]
    pairs: list[Pair]

    def matches(self, model: nn.Module) -> dict[str, nn.Module] | None:
        """``model``'s modules by name if its tree is the one the pairs were found in, else ``None``."""
        current = list(model.named_modules(remove_duplicate=False))
        same = len(current) == len(self.signature) and all(
            name == cached_name and module is ref()
            for (name, module), (cached_name, ref) in zip(current, self.signature)
        )
        return dict(current) if same else None


def _signature(model: nn.Module) -> list[tuple[str, "weakref.ReferenceType[nn.Module]"]]:
    return [(name, weakref.ref(module)) for name, module in model.named_modules(remove_duplicate=False)]


class MergeBatchNorm(Canonizer):
    """Merge every ``Conv{1,2,3}d``/``ConvTranspose{1,2,3}d``/``Linear -> BatchNorm`` pair the model executes.

    ``apply`` refuses a model with a BatchNorm in training mode, then installs a forward pre-hook
    on the model. The first forward call runs one probe forward (no grad, lrpkit hooks suspended,
    same inputs) that records which layer outputs each BatchNorm consumes and what else used
    them (see :func:`find_batchnorm_pairs`); pairs whose layer output has any other user (a
    residual branch, an activation, the model's return value) are left alone. The pairs are then
    merged and the real forward runs on the merged model. The pairs are cached per model (until
    its module tree changes), so later ``apply`` calls merge at once, without a probe.

    Parameters
    ----------
    cache
        Reuse the pairs found for a model in earlier contexts. Turn off for models whose graph
        depends on the input.
    keep_merged
        Where merged Parameters are installed (layers below ``virtual_from``, or a BatchNorm
        with a negative scale): keep them after the context, for as long as the layers live (or
        until :meth:`forget`), so that later contexts merge without a pass over the weights.
        That costs one copy of every such layer's weight (about 90 MiB if every layer of a
        ResNet50 got one); turn off to compute them in every context instead.
    virtual_from
        Merge a layer whose weight has at least this many elements without copying the weight,
        where every channel's scale ``gamma / sqrt(var + eps)`` is ``>= 0`` (the rules' weight
        modifications commute with it): a forward hook applies the BatchNorm's affine map to the
        layer's output, the layer's Parameters stay as they are, and the rules apply the scale
        to the layer's outputs and output gradients (:class:`lrpkit.ops.ScaledParams`), or make
        the merged weight for one product where that is cheaper. That saves the memory of a
        merged weight at the cost of one pass over the layer's output in the forward and about
        one per product in the backward. Smaller layers get merged Parameters (then
        ``layer.weight`` is the merged weight inside the context). ``0``: every layer;
        ``None``: none. The default, :data:`VIRTUAL_FROM` (``2**17``), merges about 97 % of a
        ResNet50's merged weights without a copy.

    Notes
    -----
    * The probe is one extra no-grad forward at the first call of each model (one per context with
      ``cache=False``), on clones of the inputs and with lrpkit's rule hooks suspended, so it
      neither builds a graph nor takes decisions such as the first layer of ``FirstLayerChoice``.
    * A BatchNorm called after several layers (or a layer called several times, each time followed
      by the same BatchNorm) merges as long as every call fits the pattern.
    * While merged, the BatchNorm is replaced by ``nn.Identity`` in every parent that registers it,
      and a forward hook makes the BatchNorm object itself an identity for code that still calls
      it through a reference of its own.
    * A BatchNorm subclass with its own ``forward`` (timm's ``BatchNormAct2d`` applies dropout and
      an activation after normalizing) is merged where the probe shows that its forward normalizes
      first: ``forward(x)`` equals ``forward`` with identity statistics applied to the plain
      BatchNorm of ``x``, on the probe's input. It then stays in the module tree with mean 0,
      variance 1, ``eps`` 0, weight 1 and bias 0 (new tensors; the originals are put back), so
      that the rest of its forward runs, and its rule (the presets': ``Pass``) applies to it.
    * The returned handle's ``pairs`` lists the merged ``(layer, batchnorm)`` names once the merge
      happened (in execution order).
    * Move or cast the model (``model.to(...)``, ``model.half()``) before entering a context, not
      inside it: a merged BatchNorm is out of the module tree meanwhile, so the call would not
      reach it (nor the scales of the layers merged without a copy).
    """

    _cache: ClassVar["weakref.WeakKeyDictionary[nn.Module, _CacheEntry]"] = weakref.WeakKeyDictionary()

    def __init__(self, cache: bool = True, keep_merged: bool = True, virtual_from: int | None = VIRTUAL_FROM) -> None:
        self.cache = cache
        self.keep_merged = keep_merged
        self.virtual_from = _check_virtual_from(virtual_from, type(self).__name__)

    def apply(self, model: nn.Module) -> list[Handle]:
        """Merge now (pairs known) or at the first forward call; the handle undoes either."""
        check_eval(model, type(self).__name__)
        cached = self._cached(model)
        if cached is not None:
            return [self._merge(model, *cached)]
        return [_LazyMerge(self, model)]

    def cached_pairs(self, model: nn.Module) -> list[Pair] | None:
        """The pairs found for ``model`` before, if still valid (and caching is on)."""
        cached = self._cached(model)
        return None if cached is None else cached[0]

    def _cached(self, model: nn.Module) -> tuple[list[Pair], dict[str, nn.Module]] | None:
        """The cached pairs and ``model``'s modules by name, if its tree is still the cached one."""
        entry = self._cache.get(model) if self.cache else None
        modules = entry.matches(model) if entry is not None else None
        return None if entry is None or modules is None else (list(entry.pairs), modules)

    def find_pairs(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Pair]:
        """Probe ``model`` with ``args``/``kwargs`` (see :func:`find_batchnorm_pairs`) and cache the pairs."""
        signature = _signature(model)
        pairs = find_batchnorm_pairs(model, *args, **kwargs)
        if self.cache:
            self._cache[model] = _CacheEntry(signature, list(pairs))
        return pairs

    @classmethod
    def forget(cls, model: nn.Module | None = None) -> None:
        """Drop the cached pairs and the kept merged parameters of ``model`` (of every model if ``None``)."""
        if model is None:
            cls._cache.clear()
        else:
            cls._cache.pop(model, None)
        release_merged(model)

    def _merge(self, model: nn.Module, pairs: list[Pair], modules: dict[str, nn.Module] | None = None) -> MergeHandle:
        """Merge ``pairs``.

        ``modules``: ``model``'s modules by name, passed by :meth:`apply`, which has just checked
        the model and walked its tree; without them both are done here (the merge at the first
        forward call, which may come after the model was switched to training mode).
        """
        if modules is None:
            check_eval(model, type(self).__name__)
        resolved = [pair for pair in _resolve(model, pairs, modules) if _merge_problem(pair[1], pair[3]) is None]
        return merge_pairs(model, resolved, self.keep_merged, self.virtual_from)

    def __repr__(self) -> str:
        options = (
            ([] if self.cache else ["cache=False"])
            + ([] if self.keep_merged else ["keep_merged=False"])
            + ([] if self.virtual_from == VIRTUAL_FROM else [f"virtual_from={self.virtual_from}"])
        )
        return f"{type(self).__name__}({', '.join(options)})"


def _check_virtual_from(virtual_from: int | None, who: str) -> int | None:
    """``virtual_from`` if it is ``None`` or a non-negative int, else a ``ValueError``."""
    valid = virtual_from is None or (
        isinstance(virtual_from, int) and not isinstance(virtual_from, bool) and virtual_from >= 0
    )
    if not valid:
        raise ValueError(f"{who}: virtual_from must be None or an int >= 0 (weight elements), got {virtual_from!r}")
    return virtual_from


class _LazyMerge:
    """The handle of a :class:`MergeBatchNorm` that merges at the model's first forward call."""

    def __init__(self, canonizer: MergeBatchNorm, model: nn.Module) -> None:
        self.canonizer = canonizer
        self.model = model
        self.merge: MergeHandle | None = None
        self._pairs: list[Pair] = []
        self._probing = False
        self._hook: RemovableHandle | None = model.register_forward_pre_hook(
            self._pre_hook, with_kwargs=True, prepend=True
        )

    @property
    def pairs(self) -> list[Pair]:
        """The merged pairs (empty before the first forward call; kept after ``remove()``)."""
        return list(self._pairs)

    def _pre_hook(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._probing or self.merge is not None or hooks_are_suspended():
            return None
        self._probing = True
        try:
            pairs = self.canonizer.cached_pairs(model)
            if pairs is None:
                pairs = self.canonizer.find_pairs(model, args, kwargs)
            self.merge = self.canonizer._merge(model, pairs)
            self._pairs = list(self.merge.pairs)
        finally:
            self._probing = False
        self._remove_hook()
        return None

    def _remove_hook(self) -> None:
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.remove()

    def remove(self) -> None:
        """Remove the pre-hook and undo the merge if it happened."""
        self._remove_hook()
        merge, self.merge = self.merge, None
        if merge is not None:
            merge.remove()


class NamedMergeBatchNorm(Canonizer):
    """Merge the BatchNorms named in ``pairs`` into the layers named with them, at ``apply`` time.

    Parameters
    ----------
    pairs
        ``[(layer_name, batchnorm_name), ...]``: qualified module names as in
        ``model.named_modules()``. A layer takes at most one BatchNorm; a BatchNorm may be named
        with several layers (it must then follow each of them, and only them).
    keep_merged
        Keep merged Parameters for later contexts, as :class:`MergeBatchNorm` does.
    virtual_from
        Merge layers with at least this many weight elements without copying their weight, as
        :class:`MergeBatchNorm` does.

    Raises
    ------
    KeyError
        (from ``apply``) If a name is not a submodule of the model.
    TypeError
        (from ``apply``) If a layer is not a ``Conv{1,2,3}d``/``Linear`` or a BatchNorm is not one.
    ValueError
        (from ``apply``) If a BatchNorm is in training mode, has no running statistics or its
        channels do not match the layer's, or a layer is named twice.
    """

    def __init__(self, pairs: PairSpec, keep_merged: bool = True, virtual_from: int | None = VIRTUAL_FROM) -> None:
        self.keep_merged = keep_merged
        self.virtual_from = _check_virtual_from(virtual_from, type(self).__name__)
        self.pairs: list[Pair] = []
        for pair in pairs:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(n, str) for n in pair)):
                raise TypeError(
                    f"{type(self).__name__}: each pair must be a (layer_name, batchnorm_name) tuple of "
                    f"two strings, got {pair!r}"
                )
            self.pairs.append((pair[0], pair[1]))

    def apply(self, model: nn.Module) -> list[Handle]:
        """Validate every pair, then merge them all (nothing is changed if one is wrong)."""
        resolved = _resolve(model, self.pairs)
        self._validate(resolved)
        return [merge_pairs(model, resolved, self.keep_merged, self.virtual_from)]

    def _validate(self, resolved: list[tuple[str, nn.Module, str, nn.Module]]) -> None:
        who = type(self).__name__
        layers: dict[int, str] = {}
        for layer_name, layer, norm_name, norm in resolved:
            if id(layer) in layers:
                raise ValueError(f"{who}: layer {layer_name!r} is named in more than one pair")
            layers[id(layer)] = layer_name
            for name, module, problem in (
                (layer_name, layer, _layer_type_problem(layer)),
                (norm_name, norm, _norm_type_problem(norm, own_forward=False)),
            ):
                if problem is not None:
                    raise TypeError(f"{who}: module {name!r} {problem}")
            if isinstance(norm, _BatchNorm) and norm.training:
                raise ValueError(
                    f"{who}: module {norm_name!r} ({type(norm).__name__}) is in training mode; call "
                    "model.eval() first"
                )
            problem = _pair_state_problem(layer, norm)
            if problem is not None:
                raise ValueError(f"{who}: cannot merge {norm_name!r} into {layer_name!r}: {problem}")

    def __repr__(self) -> str:
        keep = "" if self.keep_merged else ", keep_merged=False"
        virtual = "" if self.virtual_from == VIRTUAL_FROM else f", virtual_from={self.virtual_from}"
        return f"{type(self).__name__}({self.pairs!r}{keep}{virtual})"


__all__ = [
    "MERGEABLE_LAYERS",
    "VIRTUAL_FROM",
    "MergeBatchNorm",
    "MergeHandle",
    "NamedMergeBatchNorm",
    "batchnorm_affine",
    "check_eval",
    "find_batchnorm_pairs",
    "merge_pairs",
    "merged_parameters",
    "release_merged",
    "weight_scale",
]
