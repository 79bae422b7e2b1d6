"""MergeBatchNorm / NamedMergeBatchNorm: exact merges, executed-graph pairing, full undo.

Every model is float64 and in eval mode, with random running statistics and affine parameters
(a merge that ignored any of them would change the output). "Exact" means ``atol=1e-10``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from zennit import composites as zcomposites
from zennit.attribution import Gradient as ZennitGradient
from zennit.canonizers import NamedMergeBatchNorm as ZennitNamedMerge

from helpers import hooks_left, zero_batchnorm_eps
from lrpkit import composites
from lrpkit.attribution import Gradient
from lrpkit.canonizers import (
    MergeBatchNorm,
    NamedMergeBatchNorm,
    default_canonizers,
    find_batchnorm_pairs,
)
from lrpkit.composites import LayerMapComposite
from lrpkit.core import LayerCall, Rule

pytestmark = pytest.mark.filterwarnings("ignore::lrpkit.composites.maps.UncoveredModuleWarning")

ATOL = 1e-10
# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` in float64 eval mode with random weights, running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    model = model.double().eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)
        for module in model.modules():
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                if module.weight is not None:
                    module.weight.uniform_(0.5, 1.5, generator=generator)
                    module.bias.uniform_(-0.5, 0.5, generator=generator)
    return model


def sample(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Snapshot:
    """State, parameter objects, module objects and attributes that a canonizer must restore."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {key: value.clone() for key, value in model.state_dict().items()}
        self.parameters = [(name, param, param._version) for name, param in model.named_parameters()]
        self.modules = list(model.named_modules(remove_duplicate=False))
        self.attributes = {id(module): dict(vars(module)) for _, module in self.modules}
        self.biases = {name: module.bias for name, module in self.modules if hasattr(module, "bias")}
        self.hooks = hooks_left(model)  # the model's own (the old weight_norm's pre-hook)

    def assert_restored(self, model: nn.Module) -> None:
        state = model.state_dict()
        assert list(state) == list(self.state)
        for key, before in self.state.items():
            assert state[key].dtype == before.dtype and torch.equal(state[key], before), key
        after = list(model.named_parameters())
        assert [name for name, _ in after] == [name for name, _, _ in self.parameters]
        for (_, param), (name, original, version) in zip(after, self.parameters):
            assert param is original and param._version == version, name
        assert [(name, id(module)) for name, module in model.named_modules(remove_duplicate=False)] == [
            (name, id(module)) for name, module in self.modules
        ]
        assert hooks_left(model) == self.hooks
        for name, module in self.modules:
            assert set(vars(module)) == set(self.attributes[id(module)]), name
        for name, bias in self.biases.items():
            assert model.get_submodule(name).bias is bias, name


def merge_only(canonizer=None) -> LayerMapComposite:
    """A composite without rules that only merges."""
    return LayerMapComposite([], canonizers=[canonizer or MergeBatchNorm(cache=False)])


def output_inside(model: nn.Module, x: torch.Tensor, composite=None) -> tuple[torch.Tensor, list[type]]:
    """The model's output inside the composite's context and the module types seen there."""
    with (composite or merge_only()).context(model), torch.no_grad():
        output = model(x)
        seen = [type(module) for module in model.modules()]
    return output, seen


def norm_types() -> tuple[type, ...]:
    return (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


def has_norm(types: list[type]) -> bool:
    return any(issubclass(kind, norm_types()) for kind in types)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def chain(layer: nn.Module, norm: nn.Module) -> nn.Module:
    return randomized(nn.Sequential(layer, norm, nn.ReLU()))


SIMPLE_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv2d-bn2d": (lambda: chain(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)), (2, 2, 5, 5)),
    "conv1d-bn1d": (lambda: chain(nn.Conv1d(2, 3, 3), nn.BatchNorm1d(3)), (2, 2, 7)),
    "conv3d-bn3d": (lambda: chain(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)), (2, 2, 3, 4, 4)),
    "linear-bn1d": (lambda: chain(nn.Linear(4, 5), nn.BatchNorm1d(5)), (3, 4)),
    "conv-without-bias": (lambda: chain(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3)), (2, 2, 5, 5)),
    "linear-without-bias": (lambda: chain(nn.Linear(4, 5, bias=False), nn.BatchNorm1d(5)), (3, 4)),
    "bn-without-affine": (lambda: chain(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, affine=False)), (2, 2, 5, 5)),
    "grouped-strided-conv": (
        lambda: chain(nn.Conv2d(4, 6, 3, stride=2, groups=2, padding=1), nn.BatchNorm2d(6)),
        (2, 4, 6, 6),
    ),
    "frozen-bn2d": (lambda: chain(nn.Conv2d(2, 3, 3), FrozenBatchNorm2d(3)), (2, 2, 5, 5)),
    "convtranspose2d-bn2d": (lambda: chain(nn.ConvTranspose2d(2, 3, 3, stride=2), nn.BatchNorm2d(3)), (2, 2, 4, 4)),
    "grouped-convtranspose": (
        lambda: chain(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.BatchNorm2d(6)),
        (2, 4, 3, 3),
    ),
    "convtranspose3d-without-bias": (
        lambda: chain(nn.ConvTranspose3d(2, 3, 2, bias=False), nn.BatchNorm3d(3)),
        (2, 2, 2, 3, 3),
    ),
}


class RegisteredBackwards(nn.Module):
    """Registers ``bn`` before ``conv`` but runs ``conv -> bn``."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    """The conv output feeds both the BatchNorm and a residual addition: no merge."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return torch.relu(self.bn(z) + z)


class ShapeQueries(nn.Module):
    """Reads the conv output's shape before the BatchNorm: shape queries are no use."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        assert z.shape[1] == z.size(1) == 3 and z.dim() == 4 and z.numel() > 0
        return self.bn(z).flatten(1)


class ConvReluNorm(nn.Module):
    """conv -> relu -> bn: the BatchNorm does not follow the conv directly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


class InplaceBeforeNorm(nn.Module):
    """conv -> relu_ (same tensor object) -> bn: the in-place call is a use, no merge."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x).relu_())


class ReturnsConvOutput(nn.Module):
    """Returns the conv output besides the normalized one: a use outside, no merge."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.conv(x)
        return self.bn(z), z


class SharedNorm(nn.Module):
    """One BatchNorm called after each of two convs: both merge, the norm becomes an identity."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 3, 3)
        self.conv_b = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv_a(x)) * self.bn(self.conv_b(x))


class SharedConv(nn.Module):
    """One conv called twice, each time followed by the same BatchNorm: merges."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(torch.relu(self.bn(self.conv(x)))))


class SharedConvOtherUse(nn.Module):
    """One conv called twice, only the first call followed by the BatchNorm: no merge."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.bn(self.conv(x))))


class AliasedNorm(nn.Module):
    """The same BatchNorm registered under two names (and two parents)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.block = nn.Sequential(nn.ReLU())
        self.block.add_module("norm", self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block[0](self.bn(self.conv(x)))


class SequenceLinear(nn.Module):
    """Linear on (N, L, F): BatchNorm1d(L) normalizes dim 1, not the features -- no merge."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class ScaledConv(nn.Conv2d):
    """A conv subclass with its own forward: a merged weight would be scaled twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2.0


class CustomForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = ScaledConv(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class KeywordModel(nn.Module):
    """Takes a keyword argument, which the probe must pass on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x * scale))


class Nested(nn.Module):
    """A BatchNorm under a dotted name, for the error message."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3)
        self.layer1 = nn.Sequential(nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(self.stem(x))


class Boom(Rule):
    """A rule whose backward raises."""

    def relevance(self, call: LayerCall, relevance: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        raise RuntimeError("boom in backward")


# --------------------------------------------------------------------------------------------
# exact merges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("virtual_from", [None, 0], ids=["merged-parameters", "virtual"])
@pytest.mark.parametrize("case", list(SIMPLE_CASES))
def test_merge_is_exact_and_undone(case, virtual_from):
    factory, shape = SIMPLE_CASES[case]
    model, x = factory(), sample(*shape)
    with torch.no_grad():
        expected = model(x)
    snapshot = Snapshot(model)
    output, seen = output_inside(model, x, merge_only(MergeBatchNorm(cache=False, virtual_from=virtual_from)))
    assert not has_norm(seen), "the BatchNorm was not merged"
    assert nn.Identity in seen
    torch.testing.assert_close(output, expected, rtol=0.0, atol=ATOL)
    snapshot.assert_restored(model)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("case", ["conv2d-bn2d", "linear-without-bias", "frozen-bn2d"])
def test_apply_and_remove_directly(case):
    factory, shape = SIMPLE_CASES[case]
    model, x = factory(), sample(*shape)
    with torch.no_grad():
        expected = model(x)
    snapshot = Snapshot(model)
    (handle,) = MergeBatchNorm(cache=False).apply(model)
    assert handle.pairs == []  # nothing merged before the first forward call
    with torch.no_grad():
        output = model(x)
    assert handle.pairs == [("0", "1")]
    assert isinstance(model[1], nn.Identity)
    assert model[0].weight is not snapshot.parameters[0][1]
    assert model[0].bias is not None
    torch.testing.assert_close(output, expected, rtol=0.0, atol=ATOL)
    with torch.no_grad():  # the pre-hook is gone: a second forward does not merge again
        torch.testing.assert_close(model(x), expected, rtol=0.0, atol=ATOL)
    handle.remove()
    handle.remove()  # idempotent
    snapshot.assert_restored(model)


def test_merged_parameters_keep_requires_grad_and_originals_untouched():
    model = chain(nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3))
    model[0].weight.requires_grad_(False)
    snapshot = Snapshot(model)
    with merge_only().context(model):
        model(sample(1, 2, 5, 5))
        assert isinstance(model[0].weight, nn.Parameter) and not model[0].weight.requires_grad
        assert isinstance(model[0].bias, nn.Parameter) and not model[0].bias.requires_grad
    snapshot.assert_restored(model)
    assert model[0].bias is None


def test_merge_formula_matches_batchnorm_definition():
    model = chain(nn.Linear(4, 5), nn.BatchNorm1d(5, eps=0.1))
    fc, bn = model[0], model[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    expected_weight = fc.weight * scale[:, None]
    expected_bias = (fc.bias - bn.running_mean) * scale + bn.bias
    with merge_only().context(model):
        model(sample(2, 4))
        torch.testing.assert_close(fc.weight, expected_weight, rtol=1e-14, atol=0.0)
        torch.testing.assert_close(fc.bias, expected_bias, rtol=1e-14, atol=0.0)


# --------------------------------------------------------------------------------------------
# the executed graph decides
# --------------------------------------------------------------------------------------------

GRAPH_CASES = {
    # name: (factory, input shape, expected pairs)
    "registered-backwards": (RegisteredBackwards, (2, 2, 5, 5), [("conv", "bn")]),
    "residual": (Residual, (2, 3, 5, 5), []),
    "shape-queries": (ShapeQueries, (2, 2, 5, 5), [("conv", "bn")]),
    "conv-relu-bn": (ConvReluNorm, (2, 2, 5, 5), []),
    "inplace-before-bn": (InplaceBeforeNorm, (2, 2, 5, 5), []),
    "returns-conv-output": (ReturnsConvOutput, (2, 2, 5, 5), []),
    "shared-bn": (SharedNorm, (2, 2, 5, 5), [("conv_a", "bn"), ("conv_b", "bn")]),
    "shared-conv": (SharedConv, (2, 3, 5, 5), [("conv", "bn")]),
    "shared-conv-other-use": (SharedConvOtherUse, (2, 3, 5, 5), []),
    "aliased-bn": (AliasedNorm, (2, 2, 5, 5), [("conv", "bn")]),
    "linear-on-sequence": (SequenceLinear, (2, 6, 4), []),
    "conv-with-own-forward": (CustomForward, (2, 2, 5, 5), []),
}


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_pairs_come_from_the_executed_graph(case):
    factory, shape, pairs = GRAPH_CASES[case]
    model, x = randomized(factory()), sample(*shape)
    assert find_batchnorm_pairs(model, x) == pairs
    with torch.no_grad():
        expected = model(x)
    snapshot = Snapshot(model)
    (handle,) = MergeBatchNorm(cache=False).apply(model)
    try:
        with torch.no_grad():
            output = model(x)
        assert handle.pairs == pairs
        merged = not any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
        assert merged == bool(pairs)
        if not pairs:
            assert isinstance(model.bn, nn.modules.batchnorm._BatchNorm)  # still active
        torch.testing.assert_close(output, expected, rtol=0.0, atol=ATOL)
    finally:
        handle.remove()
    snapshot.assert_restored(model)


@pytest.mark.parametrize("where", ["conv-hook-reads-output", "bn-pre-hook-changes-input"])
def test_other_hooks_on_the_pair_prevent_the_merge(where):
    model, x = randomized(RegisteredBackwards()), sample(2, 2, 5, 5)
    if where == "conv-hook-reads-output":
        seen = []
        hook = model.conv.register_forward_hook(lambda module, args, output: seen.append(output.mean()))
    else:
        hook = model.bn.register_forward_pre_hook(lambda module, args: (args[0] + 1.0,))
    try:
        assert find_batchnorm_pairs(model, x) == []
        with torch.no_grad():
            expected = model(x)
        with merge_only().context(model), torch.no_grad():
            output = model(x)
            assert isinstance(model.bn, nn.BatchNorm2d)
        torch.testing.assert_close(output, expected, rtol=0.0, atol=ATOL)
    finally:
        hook.remove()


def test_aliased_batchnorm_is_swapped_under_every_name():
    model, x = randomized(AliasedNorm()), sample(2, 2, 5, 5)
    bn = model.bn
    with merge_only().context(model):
        model(x)
        assert isinstance(model.bn, nn.Identity) and isinstance(model.block.norm, nn.Identity)
        # a reference kept outside the module tree also acts as an identity while merged
        z = sample(2, 3, 4, 4)
        assert torch.equal(bn(z), z)
    assert model.bn is bn and model.block.norm is bn


def test_probe_passes_keyword_arguments():
    model, x = randomized(KeywordModel()), sample(2, 2, 5, 5)
    scale = torch.tensor(0.5, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x, scale=scale)
    with merge_only().context(model), torch.no_grad():
        output = model(x, scale=scale)
        assert isinstance(model.bn, nn.Identity)
    torch.testing.assert_close(output, expected, rtol=0.0, atol=ATOL)


def test_probe_does_not_change_the_inputs():
    class Inplace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x.mul_(2.0)))

    model, x = randomized(Inplace()), sample(1, 2, 5, 5)
    with torch.no_grad():
        expected = model(x.clone())
    with merge_only().context(model), torch.no_grad():
        output = model(x.clone())
    torch.testing.assert_close(output, expected, rtol=0.0, atol=ATOL)


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------


def test_pairs_are_cached_per_model_until_its_modules_change():
    factory, shape = SIMPLE_CASES["conv2d-bn2d"]
    model, x = factory(), sample(*shape)
    MergeBatchNorm.forget(model)
    canonizer = MergeBatchNorm()
    (handle,) = canonizer.apply(model)
    assert isinstance(model[1], nn.BatchNorm2d)  # first time: merged lazily, at the forward
    with torch.no_grad():
        model(x)
    assert isinstance(model[1], nn.Identity)
    handle.remove()

    snapshot = Snapshot(model)
    (handle,) = MergeBatchNorm().apply(model)  # any instance: the cache is per model
    assert isinstance(model[1], nn.Identity) and handle.pairs == [("0", "1")]  # merged at once
    handle.remove()
    snapshot.assert_restored(model)

    model.add_module("3", nn.Identity())  # the module tree changed: probe again
    (handle,) = MergeBatchNorm().apply(model)
    assert isinstance(model[1], nn.BatchNorm2d)
    handle.remove()

    (handle,) = MergeBatchNorm(cache=False).apply(model)
    assert isinstance(model[1], nn.BatchNorm2d)
    handle.remove()


def test_lazy_and_named_merges_give_the_same_relevance():
    """The probe leaves the composite alone: the first layer (Flat) is still chosen right."""
    model = randomized(
        nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Flatten(), nn.Linear(4, 3),
        )
    )
    x = sample(2, 2, 5, 5).abs()
    target = [0, 2]
    named = NamedMergeBatchNorm([("0", "1"), ("3", "4")])
    _, reference = Gradient(model, composites.EpsilonPlusFlat(canonizers=[named]))(x, target=target)
    MergeBatchNorm.forget(model)
    for canonizer in (MergeBatchNorm(), MergeBatchNorm(), MergeBatchNorm(cache=False)):  # probe, cache, probe
        output, relevance = Gradient(model, composites.EpsilonPlusFlat(canonizers=[canonizer]))(x, target=target)
        torch.testing.assert_close(relevance, reference, rtol=1e-12, atol=0.0)
    with torch.no_grad():
        torch.testing.assert_close(output, model(x), rtol=0.0, atol=ATOL)


# --------------------------------------------------------------------------------------------
# BatchNorms with their own forward (timm's BatchNormAct2d)
# --------------------------------------------------------------------------------------------


class BatchNormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` in short: normalize, then dropout and the activation, in one module."""

    def __init__(self, channels: int, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(self.drop(x))


class ActivationFirst(BatchNormAct):
    """Applies its activation before normalizing: merging would change what it computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.act(x))


class KeepsItsInput(BatchNormAct):
    """Adds its input to the result: the merged layer's output would be added instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x


def conv_net(norm: Callable[[int], nn.Module]) -> nn.Module:
    """conv -> norm -> conv -> norm -> linear, float64 with random statistics."""
    return randomized(nn.Sequential(nn.Conv2d(2, 4, 3), norm(4), nn.Conv2d(4, 4, 3), norm(4), nn.Flatten(), nn.Linear(36, 3)))


PRESETS = {
    "EpsilonPlusFlat": composites.EpsilonPlusFlat,
    "EpsilonGammaBox": lambda: composites.EpsilonGammaBox(low=-3.0, high=3.0),
    "EpsilonAlpha2Beta1": composites.EpsilonAlpha2Beta1,
}


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU], ids=["relu", "silu"])
def test_batchnorm_with_its_activation_inside_explains_as_written_out(act, preset):
    """Merged like the same model written with ``nn.BatchNorm2d`` and the activation after it.

    Left alone (as before), the relevance was 5e-2 to 1.4 (relative) off the written-out model's.
    """
    fused = conv_net(lambda channels: BatchNormAct(channels, act))
    written_out = conv_net(lambda channels: nn.Sequential(nn.BatchNorm2d(channels), nn.Identity(), act()))
    x = sample(2, 2, 7, 7)
    assert find_batchnorm_pairs(fused, x) == [("0", "1"), ("2", "3")]
    snapshot = Snapshot(fused)
    output, relevance = Gradient(fused, PRESETS[preset]())(x, target=[0, 2])
    snapshot.assert_restored(fused)
    expected_output, expected = Gradient(written_out, PRESETS[preset]())(x, target=[0, 2])
    torch.testing.assert_close(output, expected_output, rtol=0.0, atol=ATOL)
    torch.testing.assert_close(relevance, expected, rtol=0.0, atol=ATOL * float(expected.abs().max()))


PARAMETRIZATIONS = {
    "weight_norm": nn.utils.parametrizations.weight_norm,
    "spectral_norm": nn.utils.parametrizations.spectral_norm,
    "old_weight_norm": nn.utils.weight_norm,  # a forward pre-hook sets ``weight`` before each call
}


def parametrized_net(parametrize: Callable[[nn.Module], nn.Module], negative_scale: bool) -> nn.Module:
    """conv -> bn -> relu -> linear -> bn1d, every layer's weight computed by ``parametrize``."""
    model = randomized(
        nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3), nn.BatchNorm1d(3))
    )
    if negative_scale:  # a merge that scales the output must then not let the rules clamp W alone
        with torch.no_grad():
            model[1].weight[::2] *= -1
            model[5].weight[0] *= -1
    for index in (0, 4):
        model[index] = parametrize(model[index])
    return model


def with_plain_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose layers hold their computed weights as plain Parameters."""
    plain = randomized(
        nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 3), nn.BatchNorm1d(3))
    )
    plain.load_state_dict({key: value for key, value in model.state_dict().items() if "weight_" not in key and "parametrizations" not in key}, strict=False)
    with torch.no_grad():
        for index in (0, 4):
            plain[index].weight.copy_(model[index].weight)
    return plain


@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize("negative_scale", [False, True], ids=["scale>=0", "negative-scale"])
@pytest.mark.parametrize("parametrization", list(PARAMETRIZATIONS))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_layers_with_computed_weights_are_merged_as_plain_ones(preset, parametrization, negative_scale):
    """weight_norm / spectral_norm layers: the BatchNorm is merged, the relevance is the plain layers'.

    Before, such a layer was not a merge candidate and its BatchNorm took the preset's rule for a
    lone BatchNorm (``Pass``), which hands the relevance of its shift to the layer's inputs.
    """
    model = parametrized_net(PARAMETRIZATIONS[parametrization], negative_scale).eval()
    plain = with_plain_weights(model).eval()
    x = sample(5, 2, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0.0, atol=ATOL)
    snapshot = Snapshot(model)
    _, relevance = Gradient(model, composite=PRESETS[preset]())(x.clone())
    _, expected = Gradient(plain, composite=PRESETS[preset]())(x.clone())
    torch.testing.assert_close(relevance, expected, rtol=1e-9, atol=1e-12)
    snapshot.assert_restored(model)
    output, seen = output_inside(model, x, merge_only(MergeBatchNorm(cache=False)))
    assert not has_norm(seen), "the BatchNorm was not merged"


#: The presets that propagate relevance (the gradient presets, guided backprop and deconvnet, do not conserve it).
LRP_PRESETS = [name for name in composites.names() if name not in ("guided_backprop", "deconvnet")]


@pytest.mark.parametrize("name", composites.names())
def test_every_preset_passes_relevance_through_a_batchnorm_no_layer_takes_in(name):
    """A pre-activation block (ReLU -> BatchNorm -> ReLU -> convolution, as in DenseNet): the
    BatchNorm has no layer before it to merge into, and every preset passes its relevance on
    unchanged, without a warning.

    ExcitationBackprop gave it the plain gradient (the BatchNorm's scale times the relevance) and
    warned, once for each of DenseNet121's 58 such BatchNorms.
    """
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(4).double().eval()
    with torch.no_grad():  # no shift, so that relevance is conserved; scales of both signs
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.copy_(torch.tensor([1.5, -0.7, 0.4, 2.0]))
        norm.bias.zero_()
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), norm, nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3, bias=False),
    ).double().eval()
    x = sample(2, 3, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = Gradient(model, composite=composites.get_for_input(name, x))(x.clone(), record=["2"])
    if name in LRP_PRESETS:
        # what reaches the BatchNorm's input is what left its output: each sample's logit (up to the
        # stabilisers, 1e-6 against logits of about 0.04)
        logits = result.output.max(dim=1).values
        torch.testing.assert_close(result.intermediate["2"].sum(dim=(1, 2, 3)), logits, rtol=1e-3, atol=0.0)
        torch.testing.assert_close(result.relevance.sum(dim=(1, 2, 3)), logits, rtol=1e-3, atol=0.0)


def test_batchnorm_with_its_activation_inside_matches_zennit_with_the_pairs_named():
    """zennit's ``SequentialMergeBatchNorm`` skips such a module (not a leaf); named, it merges it."""
    model = conv_net(BatchNormAct)
    x = sample(2, 2, 7, 7)
    with zero_batchnorm_eps(model):
        output, ours = Gradient(model, composites.EpsilonPlus())(x, target=[0, 2])
        zennit_composite = zcomposites.EpsilonPlus(canonizers=[ZennitNamedMerge([(["0"], "1"), (["2"], "3")])])
        with ZennitGradient(model, zennit_composite) as attributor:
            _, theirs = attributor(x, torch.eye(3, dtype=x.dtype)[[0, 2]] * output.detach())
    scale = float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs.detach(), rtol=0.0, atol=1e-10 * scale)


def test_merged_batchnorm_with_its_own_forward_stays_with_identity_statistics():
    model = conv_net(BatchNormAct)
    x = sample(2, 2, 7, 7)
    with torch.no_grad():
        expected = model(x)
    snapshot = Snapshot(model)
    with merge_only().context(model), torch.no_grad():
        output = model(x)
        norm = model[1]
        assert isinstance(norm, BatchNormAct) and norm.eps == 0.0
        assert all(torch.equal(norm.get_parameter(name), torch.ones(4, dtype=torch.float64)) for name in ["weight"])
        assert not norm.running_mean.any() and not norm.bias.any()
    torch.testing.assert_close(output, expected, rtol=0.0, atol=ATOL)
    snapshot.assert_restored(model)
    assert model[1].eps == 1e-5


@pytest.mark.parametrize("norm", [ActivationFirst, KeepsItsInput])
def test_own_forward_that_does_not_normalize_first_is_not_merged(norm):
    model = conv_net(norm)
    x = sample(2, 2, 7, 7)
    assert find_batchnorm_pairs(model, x) == []
    with torch.no_grad():
        expected = model(x)
    output, seen = output_inside(model, x)
    assert seen.count(norm) == 2
    torch.testing.assert_close(output, expected, rtol=0.0, atol=0.0)


def test_named_merge_refuses_a_batchnorm_with_its_own_forward():
    model = conv_net(BatchNormAct)
    with pytest.raises(TypeError, match=re.escape("module '1' is a BatchNormAct with its own forward (MergeBatchNorm")):
        NamedMergeBatchNorm([("0", "1")]).apply(model)


# --------------------------------------------------------------------------------------------
# refusal and restoration
# --------------------------------------------------------------------------------------------


def test_training_mode_is_refused_with_the_module_name():
    model = randomized(Nested()).train()
    snapshot = Snapshot(model)
    message = "MergeBatchNorm: module 'layer1.0.1' (BatchNorm2d) is in training mode; call model.eval() first"
    with pytest.raises(ValueError, match=re.escape(message)):
        MergeBatchNorm().apply(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        with merge_only().context(model):
            pass
    snapshot.assert_restored(model)


def test_exception_in_the_body_restores_the_model():
    model = randomized(Nested())
    snapshot = Snapshot(model)
    with pytest.raises(KeyError, match="in the body"):
        with merge_only().context(model):
            model(sample(1, 2, 7, 7))
            assert isinstance(model.layer1[0][1], nn.Identity)
            raise KeyError("in the body")
    snapshot.assert_restored(model)


def test_exception_in_backward_restores_the_model():
    factory, shape = SIMPLE_CASES["conv-without-bias"]
    model = factory()
    snapshot = Snapshot(model)
    composite = LayerMapComposite([(nn.Conv2d, Boom())], canonizers=[MergeBatchNorm(cache=False)])
    with pytest.raises(RuntimeError, match="boom in backward"):
        with composite.context(model):
            x = sample(*shape).requires_grad_(True)
            model(x).sum().backward()
    snapshot.assert_restored(model)
    assert model[0].bias is None


def test_exception_in_the_probe_restores_the_model():
    factory, _ = SIMPLE_CASES["conv2d-bn2d"]
    model = factory()
    snapshot = Snapshot(model)
    with pytest.raises(RuntimeError):
        with merge_only().context(model):
            model(sample(1, 5, 5, 5))  # wrong number of channels
    snapshot.assert_restored(model)


def test_failure_while_merging_undoes_the_partial_merge(monkeypatch):
    from lrpkit.canonizers import batchnorm

    model = randomized(SharedNorm())
    snapshot = Snapshot(model)

    def failing_swap(model: nn.Module, norm: nn.Module, locations: list):
        raise RuntimeError("swap failed")

    monkeypatch.setattr(batchnorm, "_swap_for_identity", failing_swap)
    with pytest.raises(RuntimeError, match="swap failed"):
        NamedMergeBatchNorm([("conv_a", "bn"), ("conv_b", "bn")]).apply(model)
    snapshot.assert_restored(model)


# --------------------------------------------------------------------------------------------
# NamedMergeBatchNorm
# --------------------------------------------------------------------------------------------


def test_named_merge_is_exact_and_immediate():
    model, x = randomized(RegisteredBackwards()), sample(2, 2, 5, 5)
    with torch.no_grad():
        expected = model(x)
    snapshot = Snapshot(model)
    (handle,) = NamedMergeBatchNorm([("conv", "bn")]).apply(model)
    assert isinstance(model.bn, nn.Identity) and handle.pairs == [("conv", "bn")]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0.0, atol=ATOL)
    handle.remove()
    snapshot.assert_restored(model)


@pytest.mark.parametrize(
    "pairs, error, pattern",
    [
        ([("conv", "nope")], KeyError, "'nope'"),
        ([("missing.conv", "bn")], KeyError, "'missing.conv'"),
        ([("bn", "conv")], TypeError, "module 'bn' is a BatchNorm2d, not one of Conv1d"),
        ([("conv", "act")], TypeError, "module 'act' is a ReLU, not a BatchNorm"),
        ([("conv", "bn"), ("conv", "bn")], ValueError, "layer 'conv' is named in more than one pair"),
    ],
)
def test_named_merge_errors_name_the_module(pairs, error, pattern):
    model = randomized(RegisteredBackwards())
    snapshot = Snapshot(model)
    with pytest.raises(error, match=re.escape(pattern)):
        NamedMergeBatchNorm(pairs).apply(model)
    snapshot.assert_restored(model)


def test_named_merge_refuses_other_layers_wrong_channels_and_training():
    model = randomized(
        nn.Sequential(nn.ConvTranspose2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Bilinear(2, 2, 4))
    )
    snapshot = Snapshot(model)
    with pytest.raises(TypeError, match=re.escape("module '4' is a Bilinear")):
        NamedMergeBatchNorm([("4", "3")]).apply(model)
    with pytest.raises(ValueError, match="4 output channels but the BatchNorm normalizes 3"):
        NamedMergeBatchNorm([("2", "1")]).apply(model)
    model[3].train()
    with pytest.raises(ValueError, match=re.escape("module '3' (BatchNorm2d) is in training mode")):
        NamedMergeBatchNorm([("2", "3")]).apply(model)
    model.eval()
    snapshot.assert_restored(model)


def test_named_merge_wants_pairs_of_names():
    with pytest.raises(TypeError, match="tuple of two strings"):
        NamedMergeBatchNorm([(["conv"], "bn")])


def test_named_merge_is_all_or_nothing():
    model = randomized(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(3)))
    snapshot = Snapshot(model)
    with pytest.raises(ValueError):
        NamedMergeBatchNorm([("0", "1"), ("2", "3")]).apply(model)
    snapshot.assert_restored(model)


def test_default_canonizers_merge_batchnorm_then_capture():
    canonizers = default_canonizers()
    assert [type(canonizer).__name__ for canonizer in canonizers] == ["MergeBatchNorm", "FunctionalCapture"]
    assert repr(canonizers[0]) == "MergeBatchNorm()"


@pytest.mark.parametrize(
    "change",
    ["running_var in place", "conv weight in place", "new conv weight", "eps", "merged weight in place"],
)
def test_cached_merge_follows_every_change_of_its_sources(change):
    model, x = randomized(RegisteredBackwards()), sample(2, 2, 5, 5)
    canonizer = NamedMergeBatchNorm([("conv", "bn")])
    (handle,) = canonizer.apply(model)
    merged = model.conv.weight.detach()
    handle.remove()
    with torch.no_grad():
        if change == "running_var in place":
            model.bn.running_var.mul_(2.0)
        elif change == "conv weight in place":
            model.conv.weight.mul_(-1.5)
        elif change == "new conv weight":
            model.conv.weight = nn.Parameter(model.conv.weight.detach() * 3.0)
        elif change == "eps":
            model.bn.eps = 0.5
        else:
            merged.mul_(0.0)
        expected = model(x)
    (handle,) = canonizer.apply(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0.0, atol=ATOL)
    handle.remove()


def test_unchanged_sources_reuse_the_cached_merge():
    model = randomized(RegisteredBackwards())
    canonizer = NamedMergeBatchNorm([("conv", "bn")])
    (handle,) = canonizer.apply(model)
    first = model.conv.weight.detach()
    handle.remove()
    (handle,) = canonizer.apply(model)
    assert model.conv.weight.data_ptr() == first.data_ptr()
    handle.remove()


def test_cached_merge_reuses_its_parameters_unless_they_hold_a_grad_or_the_flags_differ():
    model, x = randomized(RegisteredBackwards()), sample(2, 2, 5, 5)
    canonizer = NamedMergeBatchNorm([("conv", "bn")])

    def installed() -> tuple[nn.Parameter, nn.Parameter]:
        (handle,) = canonizer.apply(model)
        parameters = (model.conv.weight, model.conv.bias)
        handle.remove()
        return parameters

    first = installed()
    assert installed()[0] is first[0] and installed()[1] is first[1]  # no new Parameter per context
    first[0].grad = torch.ones_like(first[0])
    second = installed()
    assert second[0] is not first[0] and second[0].grad is None  # a stale grad never reappears
    model.conv.weight.requires_grad_(False)
    third = installed()
    assert not third[0].requires_grad and third[0] is not second[0]
    assert model.conv.weight.requires_grad is False and isinstance(model.bn, nn.BatchNorm2d)
    (handle,) = canonizer.apply(model)
    assert model.bn is not None and model(x).shape[0] == 2
    handle.remove()


def test_merged_parameters_are_kept_only_when_asked_and_forget_lets_them_go():
    import weakref

    model, x = randomized(RegisteredBackwards()), sample(2, 2, 5, 5)
    with torch.no_grad():
        expected = model(x)

    def merged_weight(canonizer: NamedMergeBatchNorm | MergeBatchNorm) -> "weakref.ReferenceType[torch.Tensor]":
        (handle,) = canonizer.apply(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=0.0, atol=ATOL)
        reference = weakref.ref(model.conv.weight)
        handle.remove()
        return reference

    assert merged_weight(NamedMergeBatchNorm([("conv", "bn")], keep_merged=False))() is None
    kept = merged_weight(NamedMergeBatchNorm([("conv", "bn")]))
    assert kept() is not None  # kept for the next context
    assert merged_weight(NamedMergeBatchNorm([("conv", "bn")], keep_merged=False))() is None
    assert kept() is None  # a context that does not keep them drops the kept copy too
    kept = merged_weight(MergeBatchNorm())
    assert kept() is not None
    MergeBatchNorm.forget(model)
    assert kept() is None
    assert repr(MergeBatchNorm(keep_merged=False)) == "MergeBatchNorm(keep_merged=False)"
    assert repr(MergeBatchNorm(cache=False, keep_merged=False)) == "MergeBatchNorm(cache=False, keep_merged=False)"
    assert repr(MergeBatchNorm(virtual_from=None)) == "MergeBatchNorm(virtual_from=None)"
    assert repr(NamedMergeBatchNorm([("conv", "bn")], virtual_from=0)) == "NamedMergeBatchNorm([('conv', 'bn')], virtual_from=0)"


@pytest.mark.parametrize("value", [-1, 1.5, True, "all"])
def test_virtual_from_must_be_a_count_of_weight_elements(value):
    for make in (lambda: MergeBatchNorm(virtual_from=value), lambda: NamedMergeBatchNorm([("a", "b")], virtual_from=value)):
        with pytest.raises(ValueError, match="virtual_from must be None or an int >= 0"):
            make()


@pytest.mark.parametrize("virtual_from, virtual", [(None, False), (0, True), (13, False), (12, True)])
def test_layers_with_at_least_virtual_from_weight_elements_are_merged_without_a_copy(virtual_from, virtual):
    from lrpkit.ops import output_scaling

    model = randomized(nn.Sequential(nn.Conv2d(2, 6, 1), nn.BatchNorm2d(6)))  # 12 weight elements
    original = model[0].weight
    with merge_only(MergeBatchNorm(cache=False, virtual_from=virtual_from)).context(model):
        model(sample(1, 2, 3, 3))
        assert (output_scaling(model[0]) is not None) is virtual
        assert (model[0].weight is original) is virtual
