"""MergeBatchNorm on torchvision models: every conv-bn pair found, exact merge, zennit agreement.

The models get seeded random weights and random BatchNorm statistics and affine parameters (the
torchvision defaults, mean 0 / var 1 / gamma 1 / beta 0, would let a wrong merge pass). float64,
two 64x64 inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn
from zennit import composites as zcomposites
from zennit.attribution import Gradient as ZennitGradient
from zennit.canonizers import SequentialMergeBatchNorm

from helpers import hooks_left, zero_batchnorm_eps
from lrpkit import composites
from lrpkit.attribution import Gradient
from lrpkit.canonizers import MergeBatchNorm

ATOL = 1e-10
def build(factory: Callable[..., nn.Module], seed: int) -> nn.Module:
    """``factory(weights=None)`` with seeded random weights and BatchNorm statistics, float64, eval."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(weights=None).double().eval()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.5, 0.5)
    return model


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build(torchvision.models.resnet18, seed=0)


@pytest.fixture(scope="module")
def vgg16_bn() -> nn.Module:
    return build(torchvision.models.vgg16_bn, seed=0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, int]]]:
    state = {key: value.clone() for key, value in model.state_dict().items()}
    modules = [(name, id(module)) for name, module in model.named_modules(remove_duplicate=False)]
    return state, modules


def assert_restored(model: nn.Module, before: tuple[dict[str, torch.Tensor], list[tuple[str, int]]]) -> None:
    state, modules = before
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[key], value) for key, value in state.items())
    assert [(name, id(module)) for name, module in model.named_modules(remove_duplicate=False)] == modules
    assert hooks_left(model) == []


def conv_bn_names(model: nn.Module) -> list[tuple[str, str]]:
    """The expected pairs: each BatchNorm2d and the conv registered right before it."""
    pairs, last = [], None
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            pairs.append((last, name))
        elif isinstance(module, nn.Conv2d):
            last = name
    return pairs


@pytest.mark.parametrize("name, count", [("resnet18", 20), ("vgg16_bn", 13)])
def test_every_pair_found_and_merged_exactly(request, images, name, count):
    model = request.getfixturevalue(name)
    with torch.no_grad():
        expected = model(images)
    before = snapshot(model)
    expected_pairs = conv_bn_names(model)
    assert len(expected_pairs) == count
    (handle,) = MergeBatchNorm(cache=False).apply(model)
    try:
        with torch.no_grad():
            output = model(images)
        assert sorted(handle.pairs) == sorted(expected_pairs)
        assert not any(isinstance(module, nn.BatchNorm2d) for module in model.modules())
        torch.testing.assert_close(output, expected, rtol=0.0, atol=ATOL)
    finally:
        handle.remove()
    assert_restored(model, before)
    if name == "resnet18":
        assert ("layer2.0.downsample.0", "layer2.0.downsample.1") in handle.pairs


def test_resnet18_with_default_canonizers(resnet18, images):
    """A preset with default canonizers explains a ResNet with its BatchNorms merged."""
    with torch.no_grad():
        expected = resnet18(images)
    before = snapshot(resnet18)
    output, relevance = Gradient(resnet18, composites.EpsilonPlus())(images, target=[1, 2])
    torch.testing.assert_close(output, expected, rtol=0.0, atol=ATOL)
    assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert_restored(resnet18, before)


def test_vgg16_bn_relevance_matches_zennit(vgg16_bn, images):
    with zero_batchnorm_eps(vgg16_bn):
        with torch.no_grad():
            output = vgg16_bn(images)
        target = nn.functional.one_hot(output.argmax(dim=1), output.shape[1]).to(output) * output
        before = snapshot(vgg16_bn)
        ours_output, ours = Gradient(vgg16_bn, composites.EpsilonPlus())(images.clone(), target=target.clone())
        assert_restored(vgg16_bn, before)
        zennit_composite = zcomposites.EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])
        with ZennitGradient(vgg16_bn, zennit_composite) as attributor:
            theirs_output, theirs = attributor(images.clone(), target.clone())
    torch.testing.assert_close(ours_output, output, rtol=0.0, atol=ATOL)
    torch.testing.assert_close(theirs_output.detach(), output, rtol=0.0, atol=ATOL)
    scale = float(theirs.abs().max())
    assert scale > 0.0
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-6 * scale)
