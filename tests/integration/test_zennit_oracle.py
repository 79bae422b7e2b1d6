"""Whole models against zennit 0.5.1, the oracle.

lrpkit and zennit get the same model, the same input, the same composite (same rules, same
parameters) and the same relevance at the output, ``one_hot(argmax) * output``; the relevance
at the input must agree to ``rtol=1e-6`` relative to its largest entry, in float64.

zennit's ``Gradient`` attributor takes the output relevance as ``attr_output`` and uses it as
the gradient at the output (``torch.autograd.grad(..., grad_outputs=attr_output)``); lrpkit's
``Gradient`` uses a tensor ``target`` as the relevance at the output, as given -- the same thing.

Notes on the mapping of composites (zennit 0.5.1, ``zennit/composites.py``):

* ``EpsilonGammaBox`` applies ``ZBox`` only to a first *convolution*; a network without
  convolutions (the digits MLP) gets ``Epsilon`` on every dense layer and no ``ZBox`` at all.
* ``EpsilonPlusFlat`` / ``EpsilonAlpha2Beta1Flat`` apply ``Flat`` to the first dense layer or
  convolution, whichever comes first (for the MLP: ``fc1``).
* ``ExcitationBackprop`` is z+ on every dense layer and convolution, ``Norm`` on average
  pooling and nothing (the gradient) on activations.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from zennit import composites as zcomposites
from zennit.attribution import Gradient as ZennitGradient

from lrpkit import composites
from lrpkit.attribution import Gradient

RTOL = 1e-6

#: ImageNet normalisation; the VGG input is uniform noise in [0, 1] normalised with it, so the
#: per-channel box bounds below are the true bounds of the input.
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
IMAGENET_LOW = (0.0 - IMAGENET_MEAN) / IMAGENET_STD
IMAGENET_HIGH = (1.0 - IMAGENET_MEAN) / IMAGENET_STD


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def one_hot_times_output(output: torch.Tensor) -> torch.Tensor:
    """``one_hot(argmax) * output``: the target logit's value at the target, zero elsewhere."""
    return nn.functional.one_hot(output.argmax(dim=1), output.shape[1]).to(output) * output


def hook_count(model: nn.Module) -> int:
    """Number of module hooks of every kind registered anywhere in ``model``."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return sum(len(getattr(module, kind, None) or {}) for module in model.modules() for kind in kinds)


class ModelSnapshot:
    """Everything about a model that explaining it must leave unchanged."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        self.parameter_ids = [id(parameter) for parameter in model.parameters()]
        self.requires_grad = [parameter.requires_grad for parameter in model.parameters()]
        self.structure = repr(model)  # module types and flags such as ReLU(inplace=True)
        self.training = [module.training for module in model.modules()]
        self.hooks = hook_count(model)

    def assert_unchanged(self, model: nn.Module) -> None:
        state = model.state_dict()
        assert list(state) == list(self.state), "state_dict keys changed"
        for key, before in self.state.items():
            after = state[key]
            assert after.dtype == before.dtype and after.shape == before.shape, key
            assert torch.equal(after, before), f"{key} changed"
        assert [id(parameter) for parameter in model.parameters()] == self.parameter_ids
        assert [parameter.requires_grad for parameter in model.parameters()] == self.requires_grad
        assert repr(model) == self.structure
        assert [module.training for module in model.modules()] == self.training
        assert hook_count(model) == self.hooks, "hooks left behind"


def explain_with_both(model: nn.Module, ours_composite, theirs_composite, x: torch.Tensor):
    """Relevance of ``x`` from lrpkit and from zennit with the same output relevance.

    Returns ``(output, ours, theirs)``; also checks that both return the model's real output.
    """
    with torch.no_grad():
        output = model(x)
    start = one_hot_times_output(output)

    ours_output, ours = Gradient(model, composite=ours_composite)(x.clone(), target=start.clone())
    with ZennitGradient(model, theirs_composite) as attributor:
        theirs_output, theirs = attributor(x.clone(), start.clone())

    torch.testing.assert_close(ours_output.detach(), output, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(theirs_output.detach(), output, rtol=1e-12, atol=0.0)
    return output, ours.detach(), theirs.detach()


def assert_same_relevance(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    """``ours == theirs`` to ``rtol``, with an absolute tolerance relative to ``max |theirs|``."""
    assert torch.isfinite(theirs).all(), "the oracle produced non-finite relevance"
    scale = float(theirs.abs().max())
    assert scale > 0.0, "the oracle's relevance is all zero: the comparison would be vacuous"
    assert ours.shape == theirs.shape
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=rtol, atol=rtol * scale)


# --------------------------------------------------------------------------------------------
# composites: (id, lrpkit factory, zennit factory); factories take no arguments
# --------------------------------------------------------------------------------------------


def _pair(name: str, **kwargs):
    """The same preset, with the same keyword arguments, from both libraries."""
    return (lambda: getattr(composites, name)(**kwargs), lambda: getattr(zcomposites, name)(**kwargs))


VGG_CASES = {
    "EpsilonPlus": _pair("EpsilonPlus"),
    "EpsilonPlusFlat": _pair("EpsilonPlusFlat"),
    "EpsilonGammaBox[-3,3]": _pair("EpsilonGammaBox", low=-3.0, high=3.0),
    "EpsilonAlpha2Beta1": _pair("EpsilonAlpha2Beta1"),
}

DIGITS_CASES = {
    "EpsilonPlus": _pair("EpsilonPlus"),
    "EpsilonPlusFlat": _pair("EpsilonPlusFlat"),
    "EpsilonGammaBox[0,1]": _pair("EpsilonGammaBox", low=0.0, high=1.0),
    "EpsilonAlpha2Beta1": _pair("EpsilonAlpha2Beta1"),
    # non-default parameters must reach the same rules in both libraries
    "EpsilonPlus[eps=0.25,stab=1e-3]": _pair("EpsilonPlus", epsilon=0.25, stabilizer=1e-3),
    "EpsilonGammaBox[0,1,zero_bias]": _pair("EpsilonGammaBox", low=0.0, high=1.0, zero_params="bias"),
    "EpsilonAlpha2Beta1[zero_bias]": _pair("EpsilonAlpha2Beta1", zero_params="bias"),
}

CNN_ONLY_CASES = {
    "ExcitationBackprop": _pair("ExcitationBackprop"),
    "EpsilonAlpha2Beta1Flat": _pair("EpsilonAlpha2Beta1Flat"),
    "EpsilonPlusFlat[zero_bias]": _pair("EpsilonPlusFlat", zero_params="bias"),
}


# --------------------------------------------------------------------------------------------
# VGG16 (random weights, float64, 64x64)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vgg16() -> nn.Module:
    """torchvision's VGG16 with seeded random weights, eval mode, float64 (built once)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.vgg16(weights=None)
    return model.eval().double()


@pytest.fixture(scope="module")
def vgg_input() -> torch.Tensor:
    """One 64x64 RGB 'image': uniform noise in [0, 1], ImageNet-normalised (one sample keeps
    float64 VGG16 at a few seconds per composite on two CPU cores)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(1, 3, 64, 64, generator=generator, dtype=torch.float64)
    return (images - IMAGENET_MEAN) / IMAGENET_STD


@pytest.mark.parametrize("case", list(VGG_CASES))
def test_vgg16_matches_zennit(vgg16, vgg_input, case):
    make_ours, make_theirs = VGG_CASES[case]
    _, ours, theirs = explain_with_both(vgg16, make_ours(), make_theirs(), vgg_input)
    assert_same_relevance(ours, theirs)


def test_vgg16_per_channel_box_matches_zennit_and_leaves_model_unchanged(vgg16, vgg_input):
    """Per-channel ZBox bounds (tensors), and the model bit for bit unchanged by both libraries."""
    snapshot = ModelSnapshot(vgg16)
    ours_composite = composites.EpsilonGammaBox(low=IMAGENET_LOW.clone(), high=IMAGENET_HIGH.clone())
    theirs_composite = zcomposites.EpsilonGammaBox(low=IMAGENET_LOW.clone(), high=IMAGENET_HIGH.clone())

    with torch.no_grad():
        output = vgg16(vgg_input)
    start = one_hot_times_output(output)

    _, ours = Gradient(vgg16, composite=ours_composite)(vgg_input.clone(), target=start.clone())
    snapshot.assert_unchanged(vgg16)  # after lrpkit
    with ZennitGradient(vgg16, theirs_composite) as attributor:
        _, theirs = attributor(vgg_input.clone(), start.clone())
    snapshot.assert_unchanged(vgg16)  # after zennit

    assert_same_relevance(ours.detach(), theirs.detach())
    with torch.no_grad():
        torch.testing.assert_close(vgg16(vgg_input), output, rtol=0.0, atol=0.0)


# --------------------------------------------------------------------------------------------
# digits MLP and CNN (trained, float64, 8 test digits)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("digits_model", ["mlp", "cnn"], indirect=True)
@pytest.mark.parametrize("case", list(DIGITS_CASES))
def test_digits_model_matches_zennit(digits_model, digits_batch, case):
    make_ours, make_theirs = DIGITS_CASES[case]
    snapshot = ModelSnapshot(digits_model)
    _, ours, theirs = explain_with_both(digits_model, make_ours(), make_theirs(), digits_batch)
    assert_same_relevance(ours, theirs)
    snapshot.assert_unchanged(digits_model)


@pytest.mark.parametrize("case", list(CNN_ONLY_CASES))
def test_digits_cnn_matches_zennit(digits_cnn, digits_batch, case):
    make_ours, make_theirs = CNN_ONLY_CASES[case]
    snapshot = ModelSnapshot(digits_cnn)
    _, ours, theirs = explain_with_both(digits_cnn, make_ours(), make_theirs(), digits_batch)
    assert_same_relevance(ours, theirs)
    snapshot.assert_unchanged(digits_cnn)


def test_digits_cnn_signed_input_matches_zennit(digits_cnn, digits_batch):
    """Signed inputs take the generalised two-path forms of z+/gamma/alpha-beta in the first layer."""
    signed = digits_batch - 0.5
    for name in ("EpsilonPlus", "EpsilonAlpha2Beta1", "ExcitationBackprop"):
        make_ours, make_theirs = _pair(name)
        _, ours, theirs = explain_with_both(copy.deepcopy(digits_cnn), make_ours(), make_theirs(), signed)
        assert_same_relevance(ours, theirs)
    make_ours, make_theirs = _pair("EpsilonGammaBox", low=-0.5, high=0.5)
    _, ours, theirs = explain_with_both(digits_cnn, make_ours(), make_theirs(), signed)
    assert_same_relevance(ours, theirs)
