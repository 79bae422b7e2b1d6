"""FunctionalCapture: functional calls (``x + y``, ``F.relu``, ``torch.cat``, gates, attention) get rules.

Everything here runs in float64 on tiny shapes. The conservation tests use ``bias=False``
everywhere. z+ loses relevance at an output whose positive contributions are all zero (while the
output itself is negative and still receives relevance); layers whose output is not followed by
a ReLU (the stem feeding a residual addition, the last convolution of a branch) therefore get
non-negative weights, so that every rule of ``EpsilonPlus`` and ``EpsilonGammaBox`` is
conservative up to its stabilisers. The weights are scaled up (``gain``) so that activations are
large compared with the stabilisers (``1e-6``), which keeps the total error below ``1e-6``
relative; the same models are also checked with negligible stabilisers (exact to rounding).

In-place calls whose name cannot simply be rebound (an aliased ``+=``, ``+=`` on a view,
``F.relu(x, inplace=True)`` as a statement, ``x.add_(y)``) are computed on a copy and written back:
the same forward and the same relevance as the model written out-of-place.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from helpers import hooks_left
import lrpkit
from lrpkit import captured, composites, core, rules, types
from lrpkit.attribution import Gradient
from lrpkit.canonizers import FunctionalCapture
from lrpkit.canonizers.functional import _flatten_call

DTYPE = torch.float64
RTOL = 1e-6
STAB = 1e-6  # the default stabiliser of every rule


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def conv3(channels_in: int, channels_out: int) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False)


def init_weights(model: nn.Module, positive: tuple[str, ...] = (), gain: float = 8.0, seed: int = 0) -> nn.Module:
    """Deterministic weights: ``gain * N(0, 1/fan_in)``, absolute values for the names in ``positive``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = weight[0].numel()
                values = torch.randn(weight.shape, generator=generator, dtype=DTYPE) * gain / math.sqrt(fan_in)
                weight.copy_(values.abs() if name in positive else values)
    return model.to(DTYPE).eval()


def images(batch: int = 3, size: int = 5, channels: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, channels, size, size, generator=generator, dtype=DTYPE)


def assert_conserved(output: torch.Tensor, relevance: torch.Tensor, factor: float = 1.0, rtol: float = RTOL) -> None:
    """``relevance.sum() == factor * output[argmax]`` per sample, to ``rtol`` relative."""
    logits = output.max(dim=1).values
    sums = relevance.flatten(1).sum(dim=1)
    assert (logits.abs() > 1e-3).all(), logits
    error = ((sums - factor * logits) / logits).abs().max().item()
    assert error < rtol, (sums, logits, error)


def assert_explained_conserved(model: nn.Module, x: torch.Tensor, composite: Any, rtol: float = 1e-8) -> dict[str, Any]:
    """Explain ``x`` with every warning an error, check conservation, and give ``describe``'s rows by name."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, relevance = Gradient(model, composite)(x)
    assert_conserved(output, relevance, rtol=rtol)
    return {row.name: row for row in lrpkit.describe(model, x, composite)}


def stabilize(value: torch.Tensor) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``, as the design fixes it."""
    return value + STAB * torch.where(value >= 0, 1.0, -1.0).to(value)


def function_mode_stack() -> list:
    return list(torch.overrides._get_current_function_mode_stack())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_restored(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert hooks_left(model) == []
    assert function_mode_stack() == []


def one_hot_times_output(output: torch.Tensor) -> torch.Tensor:
    return F.one_hot(output.argmax(dim=1), output.shape[1]).to(output) * output


class Recording(rules.Rule):
    """Wraps a rule and records the names of the calls it explains."""

    def __init__(self, inner: rules.Rule) -> None:
        self.inner = inner
        self.needs_output = inner.needs_output
        self.names: list[str] = []

    def relevance(self, call, relevance):
        self.names.append(call.name)
        return self.inner.relevance(call, relevance)


class Exploding(rules.Rule):
    def relevance(self, call, relevance):
        raise ArithmeticError("exploding rule")


ignore_uncovered = pytest.mark.filterwarnings("ignore:.*no rule for the module")

TINY = 1e-14


def tiny_capture() -> FunctionalCapture:
    """A capture whose default rules use a negligible stabiliser (to check exactness)."""
    return FunctionalCapture(
        rules=[(captured.Add, rules.Norm(TINY)), (captured.Pool, rules.Norm(TINY)), (captured.Product, rules.Product(TINY))]
    )


#: name -> (factory, relative tolerance of conservation)
CONSERVATIVE_COMPOSITES = {
    "EpsilonPlus": (lambda: composites.EpsilonPlus(), RTOL),
    "EpsilonGammaBox": (lambda: composites.EpsilonGammaBox(low=0.0, high=1.0), RTOL),
    # the same rules with negligible stabilisers: conservation is then exact to rounding
    "EpsilonPlus-tiny": (
        lambda: composites.EpsilonPlus(epsilon=TINY, stabilizer=TINY, canonizers=[tiny_capture()]),
        1e-11,
    ),
    "EpsilonGammaBox-tiny": (
        lambda: composites.EpsilonGammaBox(low=0.0, high=1.0, epsilon=TINY, stabilizer=TINY, canonizers=[tiny_capture()]),
        1e-11,
    ),
}


# ---------------------------------------------------------------------------------------------
# models made of functional calls
# ---------------------------------------------------------------------------------------------


class Residual(nn.Module):
    """``h + f(h)`` with ``f = conv -> F.relu -> conv``, no Sum module."""

    positive = ("stem", "conv2")

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv1, self.conv2 = conv3(1, 4), conv3(4, 4), conv3(4, 4)
        self.fc = nn.Linear(4 * 5 * 5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.conv2(F.relu(self.conv1(h)))
        return self.fc(torch.flatten(h, 1))


class Branches(nn.Module):
    """Two branches joined by ``torch.cat``, then a convolution."""

    positive = ("merge",)

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.merge = conv3(1, 3), conv3(1, 2), conv3(5, 4)
        self.fc = nn.Linear(4 * 5 * 5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        return self.fc(torch.flatten(self.merge(joined), 1))


class FlattenHead(nn.Module):
    """``F.relu`` and ``torch.flatten`` before a Linear."""

    positive = ()

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv3(1, 4)
        self.fc1 = nn.Linear(4 * 5 * 5, 8, bias=False)
        self.fc2 = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(F.relu(self.conv(x)), 1)
        return self.fc2(F.relu(self.fc1(h)))


class Shared(nn.Module):
    """One block called twice in one forward."""

    positive = ("stem",)

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block = conv3(1, 4), conv3(4, 4)
        self.fc = nn.Linear(4 * 5 * 5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(self.block(h))
        h = F.relu(self.block(h))
        return self.fc(h.flatten(1))


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc(mean(x)))``; the gate is ``torch.sigmoid`` or an ``nn.Sigmoid`` module."""

    positive = ("stem",)

    def __init__(self, module_gate: bool = False) -> None:
        super().__init__()
        self.stem = conv3(1, 4)
        self.squeeze = nn.Linear(4, 4, bias=False)
        self.gate = nn.Sigmoid() if module_gate else None
        self.fc = nn.Linear(4 * 5 * 5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        scores = self.squeeze(h.mean(dim=(2, 3)))
        gate = self.gate(scores) if self.gate is not None else torch.sigmoid(scores)
        gated = h * gate[:, :, None, None]
        return self.fc(torch.flatten(gated, 1))


class InplaceBlock(nn.Module):
    """A ResNet-style block: ``F.relu(x, inplace=True)`` and ``out += identity``."""

    positive = ("stem", "conv2")

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv1, self.conv2 = conv3(1, 4), conv3(4, 4), conv3(4, 4)
        self.fc = nn.Linear(4 * 5 * 5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.stem(x)
        out = self.conv1(identity)
        out = F.relu(out, inplace=True)
        out = self.conv2(out)
        out += identity
        out = F.relu(out, inplace=True)
        return self.fc(torch.flatten(out, 1))


FUNCTIONAL_MODELS = {
    "residual": Residual,
    "cat_branches": Branches,
    "relu_flatten_linear": FlattenHead,
    "shared_block": Shared,
    "se_gate_function": lambda: SqueezeExcite(module_gate=False),
    "se_gate_module": lambda: SqueezeExcite(module_gate=True),
    "inplace_block": InplaceBlock,
}


def build(factory) -> nn.Module:
    model = factory()
    return init_weights(model, positive=type(model).positive)


# ---------------------------------------------------------------------------------------------
# 1. conservation on functional models
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("composite", list(CONSERVATIVE_COMPOSITES))
@pytest.mark.parametrize("model_name", list(FUNCTIONAL_MODELS))
def test_functional_models_conserve_relevance(model_name: str, composite: str) -> None:
    model = build(FUNCTIONAL_MODELS[model_name])
    x = images()
    factory, rtol = CONSERVATIVE_COMPOSITES[composite]
    output, relevance = Gradient(model, factory())(x)
    assert_conserved(output, relevance, rtol=rtol)


def test_without_capture_the_residual_doubles() -> None:
    """The control: the same model with ``canonizers=[]`` is not conservative (gradient through add)."""
    model = build(Residual)
    output, relevance = Gradient(model, composites.EpsilonPlus(canonizers=[]))(images())
    assert_conserved(output, relevance, factor=2.0, rtol=1e-5)


@pytest.mark.parametrize("module_gate", [False, True], ids=["torch.sigmoid", "nn.Sigmoid"])
def test_se_gate_gets_no_relevance_and_the_signal_all(module_gate: bool) -> None:
    model = build(lambda: SqueezeExcite(module_gate=module_gate))
    x = images()
    table = lrpkit.describe(model, x, composite=composites.EpsilonPlus())
    rows = {row.name: row for row in table.rows}
    logits = table.output.max(dim=1).values.sum().item()
    # the gate branch: mean -> squeeze -> sigmoid receives nothing
    gate_names = ["mean", "squeeze", "gate" if module_gate else "sigmoid"]
    for name in gate_names:
        assert name in rows, [row.name for row in table.rows]
        assert rows[name].relevance in (None, 0.0), (name, rows[name])
    # the signal: product and stem output carry all of it, and so does the input
    assert rows["mul"].relevance == pytest.approx(logits, rel=RTOL)
    assert rows["stem"].relevance == pytest.approx(logits, rel=RTOL)
    assert table.relevance.sum().item() == pytest.approx(logits, rel=RTOL)
    assert rows["mul"].rule.startswith("Product(")


class SpatialGate(nn.Module):
    """``h * sigmoid(conv(h))`` with both factors of the same shape: no broadcast to tell the gate."""

    positive = ("stem",)

    def __init__(self, module_gate: bool) -> None:
        super().__init__()
        self.stem, self.scores = conv3(1, 4), conv3(4, 4)
        self.gate = nn.Sigmoid() if module_gate else None
        self.fc = nn.Linear(4 * 5 * 5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        scores = self.scores(h)
        gate = self.gate(scores) if self.gate is not None else torch.sigmoid(scores)
        return self.fc(torch.flatten(gate * h, 1))


@pytest.mark.parametrize("module_gate", [False, True], ids=["torch.sigmoid", "nn.Sigmoid"])
def test_same_shape_gate_is_recognised_by_its_sigmoid(module_gate: bool) -> None:
    model = build(lambda: SpatialGate(module_gate))
    table = lrpkit.describe(model, images(), composite=composites.EpsilonPlus())
    rows = {row.name: row for row in table.rows}
    logits = table.output.max(dim=1).values.sum().item()
    assert rows["scores"].relevance in (None, 0.0)
    assert rows["stem"].relevance == pytest.approx(logits, rel=RTOL)
    assert table.relevance.sum().item() == pytest.approx(logits, rel=RTOL)


class GateOnSigmoid(nn.Module):
    """``s * gate(...(s))`` with ``s = sigmoid(stem(x))``: both factors come out of a gate op.

    ``gate``: a squeeze-and-excitation gate ``(N, C, 1, 1)`` through a sigmoid or a softmax over
    the channels, or a spatial softmax of the shape of ``s`` (no broadcast to tell the gate).
    """

    positive = ("stem",)

    def __init__(self, gate: str) -> None:
        super().__init__()
        self.stem = conv3(1, 4)
        self.squeeze = nn.Linear(4, 4, bias=False)
        self.scores = conv3(4, 4)
        self.gate = gate
        self.fc = nn.Linear(4 * 5 * 5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signal = torch.sigmoid(self.stem(x))
        if self.gate == "spatial softmax":
            gate = torch.softmax(self.scores(signal).flatten(2), dim=-1).view_as(signal) * 25
        else:
            scores = self.squeeze(signal.mean(dim=(2, 3)))
            gate = (torch.softmax(scores, dim=1) if self.gate == "softmax" else torch.sigmoid(scores))[:, :, None, None]
        return self.fc(torch.flatten(signal * gate, 1))


@pytest.mark.parametrize("gate", ["sigmoid", "softmax", "spatial softmax"])
def test_a_gate_on_a_sigmoid_output_is_still_the_gate(gate: str) -> None:
    """Both factors are gate outputs; the one broadcast over the other, or else the one computed
    from the other, is the gate.

    Before, the two were equals and split the relevance in half; the gate's half went into its
    softmax or sigmoid (the gradient), where it was lost (50 % of the logit with a softmax).
    """
    model = build(lambda: GateOnSigmoid(gate))
    table = lrpkit.describe(model, images(), composite=composites.EpsilonPlus())
    rows = {row.name: row for row in table.rows}
    logits = table.output.max(dim=1).values.sum().item()
    assert rows["scores" if gate == "spatial softmax" else "squeeze"].relevance in (None, 0.0)  # the gate's path
    # (float32, and the stabilisers next to sigmoid outputs: 2e-6 off; before, the gate took half)
    assert rows["stem"].relevance == pytest.approx(logits, rel=1e-5)
    assert table.relevance.sum().item() == pytest.approx(logits, rel=1e-5)


def test_se_gate_uniform_gives_the_gate_half() -> None:
    """Control for the test above: with ``gate='uniform'`` the gate branch is explained too."""
    model = build(SqueezeExcite)
    composite = composites.EpsilonPlus(canonizers=[FunctionalCapture(gate="uniform")])
    table = lrpkit.describe(model, images(), composite=composite)
    rows = {row.name: row for row in table.rows}
    total = rows["mul"].relevance
    assert rows["sigmoid"].relevance == pytest.approx(total / 2, rel=1e-5)


def test_inplace_forms_give_the_exact_forward_output() -> None:
    model = build(InplaceBlock)
    x = images()
    reference = model(x)
    attribution = Gradient(model, composites.EpsilonPlus())(x)
    assert torch.equal(attribution.output, reference.detach())
    with composites.EpsilonPlus().context(model), warnings.catch_warnings():
        warnings.simplefilter("error")
        inside = model(x.clone().requires_grad_(True))
    assert torch.equal(inside.detach(), reference.detach())


def test_inplace_forms_are_captured_under_their_out_of_place_names() -> None:
    model = build(InplaceBlock)
    capture = FunctionalCapture()
    with composites.EpsilonPlus(canonizers=[capture]).context(model):
        model(images().requires_grad_(True))
        ops = capture.ops(model)
    assert list(ops) == ["relu", "add", "relu_1", "flatten"]
    assert isinstance(ops["add"], captured.Add) and ops["add"].op == "add"
    assert isinstance(ops["relu"], captured.Activation)


def test_inplace_relu_and_augmented_add_in_a_dense_model() -> None:
    """``F.relu(h, inplace=True)`` then ``h += ...``: same forward, conservative."""

    class InplaceDense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            h = F.relu(h, inplace=True)
            h += self.fc(x)
            return h

    model = init_weights(InplaceDense())
    x = torch.rand(4, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    output, relevance = Gradient(model, composites.EpsilonPlus())(x)
    assert torch.equal(output, model(x).detach())
    assert_conserved(output, relevance, rtol=1e-5)
    composite = composites.EpsilonPlus(epsilon=TINY, stabilizer=TINY, canonizers=[tiny_capture()])
    output, relevance = Gradient(model, composite)(x)
    assert_conserved(output, relevance, rtol=1e-11)


# ---------------------------------------------------------------------------------------------
# 2. zennit 0.5.1 doubles the residual, lrpkit does not
# ---------------------------------------------------------------------------------------------


def test_residual_against_zennit() -> None:
    zcomposites = pytest.importorskip("zennit.composites")
    from zennit.attribution import Gradient as ZennitGradient

    model = build(Residual)
    x = images()
    with ZennitGradient(copy.deepcopy(model), zcomposites.EpsilonPlus()) as attributor:
        z_output, z_relevance = attributor(x, one_hot_times_output)
    output, relevance = Gradient(model, composites.EpsilonPlus())(x)
    assert torch.equal(output, z_output.detach())
    logits = output.max(dim=1).values
    z_ratio = z_relevance.flatten(1).sum(1) / logits
    ratio = relevance.flatten(1).sum(1) / logits
    assert torch.allclose(z_ratio, torch.full_like(z_ratio, 2.0), rtol=1e-5), z_ratio  # zennit doubles
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=RTOL), ratio  # lrpkit conserves
    # without capture lrpkit computes exactly what zennit computes
    _, plain = Gradient(model, composites.EpsilonPlus(canonizers=[]))(x, target=one_hot_times_output(output))
    assert torch.allclose(plain, z_relevance, rtol=1e-9, atol=1e-9 * z_relevance.abs().max().item())


# ---------------------------------------------------------------------------------------------
# 3. names, composites and the capture's own options
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.lin(x))


class Named(nn.Module):
    """Root calls, a block called twice, and blocks nested in a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4, bias=False)
        self.block = Block()
        self.layers = nn.Sequential(Block(), Block())
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.pre(x))
        h = self.block(h)
        h = self.block(h)
        h = torch.relu(h)
        h = self.layers(h)
        return self.head(torch.flatten(h, 1))


NAMED_OPS = [
    "relu",
    "block.relu",
    "block.add",
    "block.relu_1",
    "block.add_1",
    "relu_1",
    "layers.0.relu",
    "layers.0.add",
    "layers.1.relu",
    "layers.1.add",
    "flatten",
]


def named_model() -> nn.Module:
    model = init_weights(Named(), positive=("pre", "block.lin", "layers.0.lin", "layers.1.lin"), gain=2.0)
    return model


def vectors(batch: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.rand(batch, 4, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def test_names_follow_the_documented_scheme_and_are_stable() -> None:
    model = named_model()
    capture = FunctionalCapture()
    seen: list[list[str]] = []
    with composites.EpsilonPlus(canonizers=[capture]).context(model):
        handle = capture.observe(model, lambda name, op, rule, output: seen[-1].append(name))
        for _ in range(2):
            seen.append([])
            model(vectors().requires_grad_(True))
        handle.remove()
        ops = capture.ops(model)
    assert seen == [NAMED_OPS, NAMED_OPS]
    assert list(ops) == NAMED_OPS
    assert all(op.name == name for name, op in ops.items())
    # a second context captures the same names again
    capture = FunctionalCapture()
    with composites.EpsilonPlus(canonizers=[capture]).context(model):
        model(vectors(seed=5).requires_grad_(True))
        assert list(capture.ops(model)) == NAMED_OPS
    assert isinstance(ops["block.add_1"], captured.Add)
    assert isinstance(ops["relu_1"], captured.Activation) and ops["relu_1"].op == "relu"
    assert isinstance(ops["flatten"], captured.Reshape)


class NormedBlock(nn.Module):
    """``relu(bn(lin(x)) + skip(x))`` with an ``nn.Identity`` skip."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.lin(x)) + self.skip(x))


def test_names_are_the_same_when_the_batchnorm_merge_is_cached() -> None:
    """The first context merges at the first call, the next ones at once (identities in the tree)."""
    model = nn.Sequential(NormedBlock(), NormedBlock()).to(DTYPE).eval()
    for block in model:
        block.bn.running_mean.uniform_(-0.5, 0.5)
        block.bn.running_var.uniform_(0.5, 2.0)
    names = []
    for _ in range(2):
        capture = FunctionalCapture()
        with composites.EpsilonPlus(canonizers=[lrpkit.canonizers.MergeBatchNorm(), capture]).context(model):
            model(vectors().requires_grad_(True))
            names.append(list(capture.ops(model)))
            identities = [module for module in model.modules() if type(module) is nn.Identity]
            assert len(identities) == 4  # the two skips and the two merged BatchNorms' stand-ins
            assert all(not module._forward_pre_hooks and not module._forward_hooks for module in identities)
    assert names == [["0.add", "0.relu", "1.add", "1.relu"]] * 2


def _linear_epsilon(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("block.add_1", "block.add_1"),  # exact name
        ("layers.1.r*", "layers.1.relu"),  # glob
        (lambda name, module: isinstance(module, captured.Add) and name.startswith("layers.0"), "layers.0.add"),
    ],
    ids=["exact", "glob", "callable"],
)
def test_name_map_puts_a_rule_on_exactly_one_captured_op(pattern, expected: str) -> None:
    model = named_model()
    recorder = Recording(rules.Pass() if "relu" in expected else rules.Norm())
    composite = composites.NameMapComposite([(pattern, recorder), (_linear_epsilon, rules.Epsilon())])
    Gradient(model, composite)(vectors())
    assert recorder.names == [expected]
    # describe shows the rule on that row only
    recorder.names.clear()
    table = lrpkit.describe(model, vectors(), composite=composite)
    with_recorder = [row.name for row in table.rows if row.rule.startswith("Recording(")]
    assert with_recorder == [expected]
    assert recorder.names == [expected]


def test_name_map_on_a_captured_op_is_used_and_the_rest_keep_their_defaults() -> None:
    """A rule named for one call reaches it (Pass on a two-input add is refused loudly)."""
    model = named_model()
    composite = composites.NameMapComposite([("block.add", rules.Pass()), (_linear_epsilon, rules.Epsilon())])
    with pytest.raises(ValueError, match="element-wise"):
        Gradient(model, composite)(vectors())  # Pass on a two-input add is refused, not silently wrong
    table_rules = {}
    composite = composites.NameMapComposite([(_linear_epsilon, rules.Epsilon())])
    for row in lrpkit.describe(model, vectors(), composite=composite).rows:
        table_rules[row.name] = row.rule
    assert table_rules["block.add"].startswith("Norm(")
    assert table_rules["flatten"] == "gradient"
    assert table_rules["relu"] == "Pass()"


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7, bias=False)
        self.fc2 = nn.Linear(7, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def mlp_and_guided_reference(target: int = 1):
    """The MLP, an input, the one-hot start and the guided-backprop / deconvnet / plain gradients."""
    model = init_weights(Mlp(), gain=1.0)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    start = torch.eye(3, dtype=DTYPE)[[target] * 4]
    pre = x @ model.fc1.weight.detach().T
    upstream = model.fc2.weight.detach()[target].expand(4, 7)
    weight = model.fc1.weight.detach()
    reference = {
        "guided": (upstream.clamp(min=0) * (pre > 0)) @ weight,
        "deconvnet": upstream.clamp(min=0) @ weight,
        "gradient": (upstream * (pre > 0)) @ weight,
    }
    return model, x, start, reference


@ignore_uncovered
def test_layer_map_activation_group_reaches_functional_relu() -> None:
    model, x, start, reference = mlp_and_guided_reference()
    composite = composites.LayerMapComposite([(types.Activation, rules.GuidedBackprop())])
    _, relevance = Gradient(model, composite)(x, target=start)
    assert torch.allclose(relevance, reference["guided"], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(reference["gradient"], reference["guided"])  # the rule really acted
    table = lrpkit.describe(model, x, composite=composite, target=start)
    assert [(row.name, row.rule) for row in table.rows if row.name == "relu"] == [("relu", "GuidedBackprop()")]


@pytest.mark.parametrize("preset, expected", [("guided_backprop", "guided"), ("deconvnet", "deconvnet")])
def test_gradient_presets_reach_functional_relu(preset: str, expected: str) -> None:
    model, x, start, reference = mlp_and_guided_reference()
    _, relevance = Gradient(model, composites.get(preset))(x, target=start)
    assert torch.allclose(relevance, reference[expected], rtol=1e-12, atol=1e-12)


def test_composite_choice_wins_over_capture_rules() -> None:
    """Documented precedence: a preset mapping types.Sum to Norm overrides ``rules=[(Add, None)]``."""
    model = build(Residual)
    composite = composites.EpsilonPlus(canonizers=[FunctionalCapture(rules=[(captured.Add, None)])])
    rows = {row.name: row.rule for row in lrpkit.describe(model, images(), composite=composite).rows}
    assert rows["add"].startswith("Norm(")


def test_capture_rules_restore_the_gradient_for_additions() -> None:
    model = build(Residual)
    x = images()
    layer_map = [(types.Convolution, rules.ZPlus()), (types.Linear, rules.Epsilon())]
    default = composites.LayerMapComposite(layer_map)
    plain_adds = composites.LayerMapComposite(layer_map, canonizers=[FunctionalCapture(rules=[(captured.Add, None)])])
    output, relevance = Gradient(model, default)(x)
    assert_conserved(output, relevance)
    output, relevance = Gradient(model, plain_adds)(x)
    assert_conserved(output, relevance, factor=2.0, rtol=1e-5)
    rows = {row.name: row.rule for row in lrpkit.describe(model, x, composite=plain_adds).rows}
    assert rows["add"] == "gradient"
    assert rows["relu"] == "Pass()"  # the other defaults stay


def test_empty_canonizers_turn_capture_off() -> None:
    model = build(Residual)
    x = images()
    composite = composites.EpsilonPlus(canonizers=[])
    table = lrpkit.describe(model, x, composite=composite)
    assert [row.name for row in table.rows] == ["", "stem", "conv1", "conv2", "fc"]
    assert all(":" not in row.kind for row in table.rows)  # captured rows read 'Add: add'
    with composite.context(model):
        assert function_mode_stack() == []
        model(x.clone().requires_grad_(True))
        assert function_mode_stack() == []


# ---------------------------------------------------------------------------------------------
# 4. rules of captured calls against independent references
# ---------------------------------------------------------------------------------------------


def epsilon_reference(function, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """``x * J^T (R / stab(function(x)))`` with ``J`` the full Jacobian of ``function`` at ``x``."""
    output = function(x)
    jacobian = torch.autograd.functional.jacobian(function, x).reshape(output.numel(), x.numel())
    scaled = (relevance / stabilize(output)).reshape(-1)
    return x * (jacobian.T @ scaled).reshape(x.shape)


def layer_norm_reference(x: torch.Tensor, shape: tuple[int, ...], weight, bias, eps: float, relevance) -> torch.Tensor:
    dims = tuple(range(-len(shape), 0))
    sigma = torch.sqrt(x.var(dims, unbiased=False, keepdim=True) + eps)  # a constant below

    def linear_part(inputs: torch.Tensor) -> torch.Tensor:
        centred = inputs - inputs.mean(dims, keepdim=True)
        return centred / sigma * (1.0 if weight is None else weight)

    real_output = F.layer_norm(x, shape, weight, bias, eps)
    jacobian = torch.autograd.functional.jacobian(linear_part, x).reshape(x.numel(), x.numel())
    scaled = (relevance / stabilize(real_output)).reshape(-1)
    return x * (jacobian.T @ scaled).reshape(x.shape)


class FunctionalLayerNorm(nn.Module):
    def __init__(self, size: int, affine: bool) -> None:
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.randn(size, dtype=DTYPE)) if affine else None
        self.bias = nn.Parameter(torch.randn(size, dtype=DTYPE)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.size,), self.weight, self.bias, 1e-5)


def _random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@ignore_uncovered  # the root's own weight is used by the captured call
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_constant_on_functional_layer_norm(affine: bool) -> None:
    torch.manual_seed(0)
    model = FunctionalLayerNorm(5, affine).eval()
    x, relevance = _random(2, 3, 5, seed=1), _random(2, 3, 5, seed=2)
    capture = FunctionalCapture()
    composite = composites.EpsilonPlus(canonizers=[capture])
    _, result = Gradient(model, composite)(x, target=relevance)
    weight = None if model.weight is None else model.weight.detach()
    bias = None if model.bias is None else model.bias.detach()
    expected = layer_norm_reference(x, (5,), weight, bias, 1e-5, relevance)
    assert torch.allclose(result, expected, rtol=1e-10, atol=1e-12)
    if not affine:  # zero beta: conservative
        assert result.sum().item() == pytest.approx(relevance.sum().item(), rel=1e-5)


@pytest.mark.parametrize("how", ["module-rule", "captured-inside-module"])
def test_layer_norm_constant_on_nn_layer_norm(how: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(6)).to(DTYPE).eval()
    with torch.no_grad():
        model[0].weight.normal_()
        model[0].bias.normal_()
    x, relevance = _random(2, 4, 6, seed=3), _random(2, 4, 6, seed=4)
    if how == "module-rule":
        composite = composites.LayerMapComposite([(nn.LayerNorm, rules.LayerNormConstant())], canonizers=[])
    else:
        composite = composites.EpsilonPlus()
    table = lrpkit.describe(model, x, composite=composite, target=relevance)
    rows = {row.name: row.rule for row in table.rows}
    if how == "module-rule":
        assert rows["0"].startswith("LayerNormConstant(")
    else:
        assert rows["0.layer_norm"].startswith("LayerNormConstant(")
    norm = model[0]
    expected = layer_norm_reference(x, (6,), norm.weight.detach(), norm.bias.detach(), norm.eps, relevance)
    assert torch.allclose(table.relevance, expected, rtol=1e-10, atol=1e-12)


class Attention(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, bias=True, batch_first=batch_first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def attention_value_reference(mha: nn.MultiheadAttention, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Self-attention by hand (sequence-first ``x``), attention weights fixed, epsilon on the value."""
    length, batch, embed = x.shape
    heads, width = mha.num_heads, mha.head_dim
    w_q, w_k, w_v = mha.in_proj_weight.detach().chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.detach().chunk(3)
    w_o, b_o = mha.out_proj.weight.detach(), mha.out_proj.bias.detach()

    def split(t: torch.Tensor) -> torch.Tensor:  # (L, B, E) -> (B, H, L, d)
        return t.reshape(length, batch, heads, width).permute(1, 2, 0, 3)

    query, key = split(x @ w_q.T + b_q), split(x @ w_k.T + b_k)
    weights = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(width), dim=-1)

    def value_path(v: torch.Tensor) -> torch.Tensor:
        mixed = weights @ split(v @ w_v.T + b_v)  # (B, H, L, d)
        merged = mixed.permute(2, 0, 1, 3).reshape(length, batch, embed)
        return merged @ w_o.T + b_o

    with torch.no_grad():
        real, _ = mha(x, x, x, need_weights=False) if not mha.batch_first else (None, None)
    if real is not None:
        assert torch.allclose(value_path(x), real, atol=1e-12)  # the reference is the same function
    return epsilon_reference(value_path, x, relevance)


@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_value_on_multihead_attention(batch_first: bool) -> None:
    torch.manual_seed(0)
    model = Attention(batch_first).to(DTYPE).eval()
    with torch.no_grad():
        model.attention.in_proj_bias.normal_()
        model.attention.out_proj.bias.normal_()
    x, relevance = _random(4, 2, 6, seed=5), _random(4, 2, 6, seed=6)  # (L, B, E)
    if batch_first:
        inputs, target = x.transpose(0, 1).contiguous(), relevance.transpose(0, 1).contiguous()
    else:
        inputs, target = x, relevance
    table = lrpkit.describe(model, inputs, composite=composites.EpsilonPlus(), target=target)
    rule_rows = [(row.name, row.rule) for row in table.rows if row.rule.startswith("AttentionValue")]
    assert rule_rows == [("attention.multi_head_attention_forward", "AttentionValue(stabilizer=1e-06)")]
    expected = attention_value_reference(model.attention, x, relevance)
    result = table.relevance.transpose(0, 1) if batch_first else table.relevance
    assert torch.allclose(result, expected, rtol=1e-9, atol=1e-11)


def test_attention_value_with_default_need_weights() -> None:
    class DefaultCall(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = nn.MultiheadAttention(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attention(x, x, x)[0]

    torch.manual_seed(0)
    model = DefaultCall().to(DTYPE).eval()
    x, relevance = _random(4, 2, 6, seed=5), _random(4, 2, 6, seed=6)
    _, result = Gradient(model, composites.EpsilonPlus())(x, target=relevance)
    expected = attention_value_reference(model.attention, x, relevance)
    assert torch.allclose(result, expected, rtol=1e-9, atol=1e-11)


class MaskedAttention(nn.Module):
    """Self-attention with masks, unbatched input or separate projections (``kdim``)."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        kdim = 4 if case == "separate projections" else None
        self.attention = nn.MultiheadAttention(6, 2, bias=True, kdim=kdim, vdim=kdim)
        self.lift = nn.Linear(4, 6)  # the query from a 4-wide input, for kdim = vdim = 4

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.lift(x) if self.case == "separate projections" else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(self.query(x), x, x, need_weights=False, **self.masks(x))[0]

    def masks(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        length = x.shape[0]
        if self.case == "causal mask":
            return {"attn_mask": torch.ones(length, length, dtype=torch.bool).triu(1)}
        if self.case == "padding mask":
            padding = torch.zeros(x.shape[1], length, dtype=torch.bool)
            padding[0, -1] = True
            return {"key_padding_mask": padding}
        if self.case == "float mask":
            return {"attn_mask": _random(length, length, seed=21)}
        return {}


@pytest.mark.parametrize("case", ["causal mask", "padding mask", "float mask", "unbatched", "separate projections"])
def test_attention_value_with_masks_unbatched_input_or_separate_projections(case: str) -> None:
    torch.manual_seed(1)
    model = MaskedAttention(case).to(DTYPE).eval()
    with torch.no_grad():
        for name, parameter in model.attention.named_parameters():
            if "bias" in name:
                parameter.normal_()
    width = 4 if case == "separate projections" else 6
    x = _random(4, 2, width, seed=22)[:, 0] if case == "unbatched" else _random(4, 2, width, seed=22)
    relevance = _random(*x.shape[:-1], 6, seed=23)
    _, result = Gradient(model, composites.EpsilonPlus())(x, target=relevance)
    mha = model.attention
    with torch.no_grad():
        _, weights = mha(model.query(x), x, x, need_weights=True, average_attn_weights=False, **model.masks(x))
    value_weight = mha.v_proj_weight if case == "separate projections" else mha.in_proj_weight[12:]
    value_bias = mha.in_proj_bias[12:]

    def value_path(value: torch.Tensor) -> torch.Tensor:  # (L, [B,] E) with the weights held fixed
        heads = (value @ value_weight.T + value_bias).unflatten(-1, (2, 3)).movedim(0, -2)  # ([B,] H, L, d)
        mixed = (weights.detach() @ heads).movedim(-2, 0).flatten(-2)
        return mixed @ mha.out_proj.weight.T + mha.out_proj.bias

    with torch.no_grad():
        assert torch.allclose(value_path(x), model(x), atol=1e-12)  # the reference is the same function
    expected = epsilon_reference(value_path, x, relevance)
    assert torch.allclose(result, expected, rtol=1e-9, atol=1e-11)


class Sdpa(nn.Module):
    """``F.scaled_dot_product_attention`` with queries/keys computed from the input (or fixed)."""

    def __init__(self, from_input: bool, causal: bool) -> None:
        super().__init__()
        self.from_input, self.causal = from_input, causal
        self.w_q = nn.Parameter(_random(5, 5, seed=7))
        self.w_k = nn.Parameter(_random(5, 5, seed=8))
        self.q = nn.Parameter(_random(2, 2, 3, 5, seed=9))
        self.k = nn.Parameter(_random(2, 2, 3, 5, seed=10))

    def queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.from_input:
            return x @ self.w_q, x @ self.w_k
        return self.q, self.k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key = self.queries_keys(x)
        return F.scaled_dot_product_attention(query, key, x, is_causal=self.causal)


@ignore_uncovered
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("from_input", [False, True], ids=["fixed-qk", "qk-from-input"])
def test_attention_value_on_scaled_dot_product_attention(from_input: bool, causal: bool) -> None:
    model = Sdpa(from_input, causal).eval()
    x, relevance = _random(2, 2, 3, 5, seed=11), _random(2, 2, 3, 5, seed=12)
    _, result = Gradient(model, composites.EpsilonPlus())(x, target=relevance)
    with torch.no_grad():
        query, key = model.queries_keys(x)
        scores = query @ key.transpose(-1, -2) / math.sqrt(5)
        if causal:
            scores = scores.masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        output = weights @ x
        assert torch.allclose(output, model(x), atol=1e-12)
        expected = x * (weights.transpose(-1, -2) @ (relevance / stabilize(output)))
    assert torch.allclose(result, expected, rtol=1e-10, atol=1e-12)


@ignore_uncovered
@pytest.mark.parametrize("value_shape", [(1, 2, 3, 5), (3, 5)], ids=["batch of one", "no batch dimensions"])
def test_attention_value_with_a_value_broadcast_over_the_batch(value_shape: tuple[int, ...]) -> None:
    model = Sdpa(from_input=False, causal=False).eval()  # queries and keys: (2, 2, 3, 5) parameters
    x, relevance = _random(*value_shape, seed=17), _random(2, 2, 3, 5, seed=18)
    _, result = Gradient(model, composites.EpsilonPlus())(x, target=relevance)
    with torch.no_grad():
        weights = torch.softmax(model.q @ model.k.transpose(-1, -2) / math.sqrt(5), dim=-1)
        output = weights @ x
        assert torch.allclose(output, model(x), atol=1e-12)
        shares = weights.transpose(-1, -2) @ (relevance / stabilize(output))  # per batch element
        expected = x * shares.sum_to_size(x.shape)
    assert result.shape == x.shape
    assert torch.allclose(result, expected, rtol=1e-10, atol=1e-12)


class GroupedQueryAttention(nn.Module):
    """``F.scaled_dot_product_attention(..., enable_gqa=True)``: 4 query heads share 2 key/value heads."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(_random(2, 4, 3, 5, seed=21))
        self.k = nn.Parameter(_random(2, 2, 3, 5, seed=22))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(self.q, self.k, x, is_causal=True, enable_gqa=True)


@ignore_uncovered
def test_attention_value_with_grouped_query_attention() -> None:
    """Each value head gets the relevance of the query heads of its group (Llama, Mistral, Qwen2)."""
    model = GroupedQueryAttention().eval()
    x, relevance = _random(2, 2, 3, 5, seed=23), _random(2, 4, 3, 5, seed=24)
    _, result = Gradient(model, composites.EpsilonPlus())(x, target=relevance)
    with torch.no_grad():
        keys, values = model.k.repeat_interleave(2, dim=1), x.repeat_interleave(2, dim=1)  # heads 0, 0, 1, 1
        scores = (model.q @ keys.transpose(-1, -2) / math.sqrt(5)).masked_fill(
            ~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf")
        )
        weights = torch.softmax(scores, dim=-1)
        output = weights @ values
        assert torch.allclose(output, model(x), atol=1e-12)
        shares = weights.transpose(-1, -2) @ (relevance / stabilize(output))  # (2, 4, 3, 5), per query head
        expected = x * (shares[:, 0::2] + shares[:, 1::2])
    assert torch.allclose(result, expected, rtol=1e-10, atol=1e-12)


class MaskedQuery(nn.Module):
    """Attention whose first query may attend to nothing (a left-padded position under a causal mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(_random(2, 2, 3, 5, seed=9))
        self.k = nn.Parameter(_random(2, 2, 3, 5, seed=10))
        keep = torch.ones(3, 3, dtype=torch.bool).tril()
        keep[:, 0] = False  # key 0 is padding
        self.register_buffer("keep", keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(self.q, self.k, x, attn_mask=self.keep)


@ignore_uncovered
def test_attention_value_with_a_query_that_attends_to_nothing() -> None:
    """``scaled_dot_product_attention`` gives zeros there; the recomputed softmax gave NaN relevance.

    Llama, Mistral and GPT-2 (transformers) explained a left-padded batch as NaN everywhere.
    """
    model = MaskedQuery().eval()
    x, relevance = _random(2, 2, 3, 5, seed=25), _random(2, 2, 3, 5, seed=26)
    _, result = Gradient(model, composites.EpsilonPlus())(x, target=relevance)
    with torch.no_grad():
        scores = (model.q @ model.k.transpose(-1, -2) / math.sqrt(5)).masked_fill(~model.keep, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # query 0: no key, zero weights
        output = weights @ x
        assert torch.allclose(output, model(x), atol=1e-12)
        expected = x * (weights.transpose(-1, -2) @ (relevance / stabilize(output)))
    assert torch.isfinite(result).all()
    assert torch.allclose(result, expected, rtol=1e-10, atol=1e-12)


class Multiply(nn.Module):
    """``a * b`` of two slices of the input; ``broadcast`` makes ``b`` one column."""

    def __init__(self, broadcast: bool) -> None:
        super().__init__()
        self.broadcast = broadcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x[:, :3]
        b = x[:, 3:4] if self.broadcast else x[:, 3:]
        return a * b


@pytest.mark.parametrize("gate", ["signal", "uniform"])
def test_product_of_two_signals_splits_relevance_in_half(gate: str) -> None:
    model = Multiply(broadcast=False)
    x, relevance = _random(4, 6, seed=13), _random(4, 3, seed=14)
    composite = composites.EpsilonPlus(canonizers=[FunctionalCapture(gate=gate)])
    _, result = Gradient(model, composite)(x, target=relevance)
    product = x[:, :3] * x[:, 3:]
    half = relevance / 2 * product / stabilize(product)
    assert torch.allclose(result, torch.cat([half, half], dim=1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("gate", ["signal", "uniform"])
def test_product_with_a_broadcast_factor(gate: str) -> None:
    """``signal``: the broadcast factor is a gate (no relevance); ``uniform``: half of it each."""
    model = Multiply(broadcast=True)
    x, relevance = _random(4, 6, seed=15), _random(4, 3, seed=16)
    composite = composites.EpsilonPlus(canonizers=[FunctionalCapture(gate=gate)])
    _, result = Gradient(model, composite)(x, target=relevance)
    product = x[:, :3] * x[:, 3:4]
    share = relevance * product / stabilize(product)
    expected = torch.zeros_like(x)
    if gate == "signal":
        expected[:, :3] = share
    else:
        expected[:, :3] = share / 2
        expected[:, 3] = share.sum(dim=1) / 2
    assert torch.allclose(result, expected, rtol=1e-12, atol=1e-14)


def test_gate_argument_is_checked() -> None:
    with pytest.raises(ValueError, match="gate"):
        FunctionalCapture(gate="half")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# 5. safety: exceptions, no_grad, backward after the context
# ---------------------------------------------------------------------------------------------


class Tripwire(nn.Module):
    """Identity that raises when armed (an exception in the middle of the model's forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.modes: list[list[str]] = []  # the TorchFunctionModes active at each call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append([type(mode).__name__ for mode in function_mode_stack()])
        if self.armed:
            raise KeyError("tripwire")
        return x


class Fragile(nn.Module):
    positive = ("lin",)

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4, bias=False)
        self.trip = Tripwire()
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + F.relu(self.lin(x))
        h = self.trip(h)
        return self.head(torch.flatten(h, 1))


def fragile() -> Fragile:
    return init_weights(Fragile(), positive=Fragile.positive)


def test_mode_is_active_only_during_the_forward() -> None:
    model = fragile()
    with composites.EpsilonPlus(canonizers=[FunctionalCapture()]).context(model):
        assert function_mode_stack() == []
        model(vectors().requires_grad_(True))
        assert function_mode_stack() == []
    with composites.EpsilonPlus(canonizers=[]).context(model):
        model(vectors().requires_grad_(True))
    assert model.trip.modes == [["_CaptureMode"], []]


@pytest.mark.parametrize("canonizers", ["default", "capture-only"])
def test_exception_in_forward_restores_everything(canonizers: str) -> None:
    model = fragile()
    before = snapshot(model)
    make = {
        "default": lambda: composites.EpsilonPlus(),
        "capture-only": lambda: composites.EpsilonPlus(canonizers=[FunctionalCapture()]),
    }[canonizers]
    Gradient(model, make())(vectors())  # warm up: MergeBatchNorm's probe forward is cached now
    model.trip.armed = True
    model.trip.modes.clear()
    composite = make()
    with pytest.raises(KeyError, match="tripwire"):
        with composite.context(model):
            model(vectors().requires_grad_(True))
    assert model.trip.modes == [["_CaptureMode"]]  # it raised inside the captured forward
    assert_restored(model, before)
    # inside one context: the failed forward leaves no mode behind and the next forward works
    with composite.context(model):
        with pytest.raises(KeyError, match="tripwire"):
            model(vectors().requires_grad_(True))
        assert function_mode_stack() == []
        model.trip.armed = False
        x = vectors().requires_grad_(True)
        output = model(x)
        target = one_hot_times_output(output.detach())
        (relevance,) = torch.autograd.grad(output, x, target)
        assert function_mode_stack() == []
    assert_restored(model, before)
    assert_conserved(output.detach(), relevance)
    # and a fresh context afterwards
    output, relevance = Gradient(model, composites.EpsilonPlus())(vectors())
    assert_conserved(output, relevance)
    assert_restored(model, before)


def test_exception_in_backward_restores_everything() -> None:
    model = fragile()
    before = snapshot(model)
    composite = composites.NameMapComposite([("add", Exploding()), (_linear_epsilon, rules.Epsilon())])
    with pytest.raises(ArithmeticError, match="exploding rule"):
        Gradient(model, composite)(vectors())
    assert_restored(model, before)
    output, relevance = Gradient(model, composites.EpsilonPlus())(vectors())
    assert_conserved(output, relevance)
    assert_restored(model, before)


def test_forward_under_no_grad_inside_the_context() -> None:
    model = build(SqueezeExcite)
    x = images()
    reference = model(x)
    capture = FunctionalCapture()
    with composites.EpsilonPlus(canonizers=[capture]).context(model):
        with torch.no_grad():
            output = model(x)
        assert capture.ops(model) == {}  # nothing carries a gradient: nothing is captured
        assert function_mode_stack() == []
    assert torch.equal(output, reference.detach())
    assert not output.requires_grad


def test_part_of_the_forward_under_no_grad() -> None:
    """A gate computed under ``torch.no_grad()`` is a constant: the signal gets all relevance."""

    class DetachedGate(SqueezeExcite):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            with torch.no_grad():
                gate = torch.sigmoid(self.squeeze(h.mean(dim=(2, 3))))
            return self.fc(torch.flatten(h * gate[:, :, None, None], 1))

    model = build(DetachedGate)
    x = images()
    reference = model(x)
    output, relevance = Gradient(model, composites.EpsilonPlus())(x)
    assert torch.equal(output, reference.detach())
    assert_conserved(output, relevance)


def test_backward_after_the_context_closed_raises_at_a_captured_op() -> None:
    class EndsInAdd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.lin(x)

    model = init_weights(EndsInAdd())
    x = vectors().requires_grad_(True)
    with composites.EpsilonPlus().context(model):
        output = model(x)
    assert type(output.grad_fn).__name__ != "AddBackward0"  # routed through the add's rule
    with pytest.raises(RuntimeError, match=r"'add' \(Add\) after its composite context was closed"):
        output.sum().backward()
    assert function_mode_stack() == []


# ---------------------------------------------------------------------------------------------
# in-place forms whose name cannot be rebound: computed on a copy and written back
# ---------------------------------------------------------------------------------------------


class InPlaceForms(nn.Module):
    """One in-place form (``form``) or the same computation written out-of-place (``form=None``).

    ``a`` is the output of a layer with a rule, which keeps it for its backward: every in-place
    form below changes it after that layer's forward.
    """

    FORMS = ("aliased_augmented", "relu_statement", "view_augmented", "named_view_augmented", "add_method", "relu_method", "mul_method")

    def __init__(self, form: str | None) -> None:
        super().__init__()
        self.form = form
        self.lin, self.side = nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False)
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, y = self.lin(x), self.side(x)
        out = getattr(self, self.form)(a, y) if self.form is not None else self.reference(a, y)
        return self.out(out)

    def reference(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return {
            "aliased_augmented": lambda: (a + y) * (a + y),
            "relu_statement": lambda: F.relu(a),
            "view_augmented": lambda: torch.cat([a[:, :3] + y[:, :3], a[:, 3:]], 1),
            "named_view_augmented": lambda: torch.cat([a[:, :3] + y[:, :3], a[:, 3:]], 1),
            "add_method": lambda: a + y,
            "relu_method": lambda: F.relu(a),
            "mul_method": lambda: a * 0.5,
        }[self.reference_form]()

    def aliased_augmented(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = a
        a += y  # changes b too
        return a * b

    def relu_statement(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        F.relu(a, inplace=True)
        return a

    def view_augmented(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a[:, :3] += y[:, :3]  # MViT's residual pooling: getitem, iadd on the view, setitem
        return a

    def named_view_augmented(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        head = a[:, :3]
        head += y[:, :3]  # changes a through its view
        return a

    def add_method(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a.add_(y)  # MViT's position embedding
        return a

    def relu_method(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a.relu_()
        return a

    def mul_method(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a.mul_(0.5)
        return a


def in_place_pair(form: str) -> tuple[nn.Module, nn.Module]:
    """The model with ``form`` and the same weights written out-of-place."""
    models = []
    for variant in (form, None):
        torch.manual_seed(0)
        model = InPlaceForms(variant).to(DTYPE).eval()
        model.reference_form = form
        models.append(model)
    return models[0], models[1]


@pytest.mark.parametrize("composite", [composites.EpsilonPlus, composites.EpsilonAlpha2Beta1], ids=["EpsilonPlus", "A2B1"])
@pytest.mark.parametrize("form", InPlaceForms.FORMS)
def test_in_place_forms_explain_as_written_out_of_place(form: str, composite: Callable[[], composites.Composite]) -> None:
    in_place, out_of_place = in_place_pair(form)
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = Gradient(in_place, composite())(x)
    reference = Gradient(out_of_place, composite())(x)
    assert torch.equal(ours.output, reference.output)
    assert ours.relevance.abs().sum() > 0
    torch.testing.assert_close(ours.relevance, reference.relevance, rtol=1e-10, atol=1e-14)
    assert function_mode_stack() == [] and hooks_left(in_place) == []


@pytest.mark.parametrize("form", ["add_method", "view_augmented", "relu_statement"])
def test_in_place_forms_are_captured(form: str) -> None:
    in_place, _ = in_place_pair(form)
    capture = FunctionalCapture()
    with composites.EpsilonPlus(canonizers=[capture]).context(in_place):
        in_place(torch.rand(2, 4, dtype=DTYPE, requires_grad=True))
        ops = capture.ops(in_place)
    expected = {"add_method": captured.Add, "view_augmented": captured.Add, "relu_statement": captured.ReLU}[form]
    assert any(type(op) is expected for op in ops.values()), ops


class ShapeInPlace(nn.Module):
    """In-place methods that are no element-wise op (``unsqueeze_``) stay uncaptured and in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lin(x)
        a.unsqueeze_(1)
        return a.sum(1)


def test_other_in_place_methods_run_in_place() -> None:
    torch.manual_seed(0)
    model = ShapeInPlace().to(DTYPE).eval()
    x = torch.rand(2, 4, dtype=DTYPE)
    output, relevance = Gradient(model, composites.EpsilonPlus())(x)
    assert torch.equal(output, model(x))
    assert_conserved(output, relevance, rtol=1e-4)  # the stabilisers' share: logits are about 0.1


def _frame_locals_reader(frame: FrameType, event: str, arg: object) -> object:
    """What debuggers (pdb, IDEs) and some profilers do: read each frame's locals."""
    frame.f_locals
    return _frame_locals_reader


@contextlib.contextmanager
def _locals_read_by(install: Callable[[Any], None]) -> Iterator[None]:
    install(_frame_locals_reader)
    try:
        yield
    finally:
        install(None)


@pytest.mark.parametrize("install", [sys.settrace, sys.setprofile], ids=["settrace", "setprofile"])
def test_augmented_assignment_is_rebound_under_a_debugger(install: Callable[[Any], None], monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot of ``f_locals`` refers to ``out``: it must not make ``out += identity`` look shared.

    Seen as shared, the sum would be written back into ``conv2``'s output, which that layer's
    rule then has to compute again: the same numbers at the cost of one more forward.
    """
    recomputed: list[str] = []
    original = core._recomputed
    monkeypatch.setattr(core, "_recomputed", lambda ops, inputs: recomputed.append("forward") or original(ops, inputs))
    model = build(InplaceBlock)
    x = images()
    epsilon = composites.EpsilonPlus(layer_map=[(types.Convolution, rules.Epsilon())])  # keeps conv2's output
    expected = Gradient(model, epsilon)(x)
    assert recomputed == []
    with _locals_read_by(install):
        traced = Gradient(model, epsilon)(x)
    assert recomputed == []
    assert torch.equal(traced.relevance, expected.relevance)


def test_an_alias_is_still_seen_under_a_debugger() -> None:
    in_place, out_of_place = in_place_pair("aliased_augmented")
    x = torch.rand(3, 4, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    reference = Gradient(out_of_place, composites.EpsilonPlus())(x)
    with _locals_read_by(sys.settrace):
        traced = Gradient(in_place, composites.EpsilonPlus())(x)
    assert torch.equal(traced.output, reference.output)
    torch.testing.assert_close(traced.relevance, reference.relevance, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 6. lrpkit.describe
# ---------------------------------------------------------------------------------------------


def test_describe_a_residual_model() -> None:
    model = build(Residual)
    x = images()
    table = lrpkit.describe(model, x, composite="epsilon_plus")
    names = [row.name for row in table.rows]
    assert names == ["", "stem", "conv1", "relu", "conv2", "add", "flatten", "fc"]
    rows = {row.name: row for row in table.rows}
    assert rows[""].rule == "-"
    assert rows["stem"].rule.startswith("ZPlus(") and rows["fc"].rule.startswith("Epsilon(")
    assert rows["relu"].rule == "Pass()" and rows["relu"].kind == "ReLU: relu"
    assert rows["add"].rule == "Norm(stabilizer=1e-06)" and rows["add"].kind == "Add: add"
    assert rows["flatten"].rule == "gradient" and rows["flatten"].kind == "Reshape: flatten"
    assert rows["add"].shape == (3, 4, 5, 5) and rows["flatten"].shape == (3, 100)
    logits = table.output.max(dim=1).values.sum().item()
    # the conservative chain: root output, fc, flatten, add, stem output and the input
    for name in ["", "fc", "flatten", "add", "stem"]:
        assert rows[name].relevance == pytest.approx(logits, rel=RTOL), name
    assert table.relevance.sum().item() == pytest.approx(logits, rel=RTOL)
    # inside the residual branch: conv2 -> relu -> conv1 conserve its (smaller) share
    share = rows["conv2"].relevance
    assert share != pytest.approx(logits, rel=1e-3)  # a part, not all (all would mean doubling)
    assert rows["relu"].relevance == pytest.approx(share, rel=RTOL)
    assert rows["conv1"].relevance == pytest.approx(share, rel=RTOL)
    # the table renders: a header and one line per row
    text = str(table)
    lines = text.splitlines()
    assert len(lines) == len(table.rows) + 1
    assert lines[0].split() == ["#", "name", "kind", "rule", "output", "shape", "relevance", "sum"]
    assert "(root)" in lines[1]
    assert "Norm(stabilizer=1e-06)" in text and "Add: add" in text and "3x4x5x5" in text
    assert model is not None and hooks_left(model) == []


def test_describe_a_module_explained_through_its_calls() -> None:
    """A GroupNorm module has no rule of its own: its row says ``-`` and its call's row has the rule."""
    model = nn.Sequential(conv3(1, 4), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).to(DTYPE)
    table = lrpkit.describe(model, images(), composite="epsilon_plus")
    rows = {row.name: row for row in table.rows}
    assert rows["1"].rule == "-" and rows["1.group_norm"].rule.startswith("LayerNormConstant(")
    assert rows["3"].rule == "-" and rows["3.flatten"].rule == "gradient"
    assert rows["2"].rule == "Pass()" and rows["4"].rule.startswith("Epsilon(")


class LogScale(nn.Module):
    """Swin V2's ``logit_scale``: a factor computed from a parameter alone (``clamp``, ``exp``), then a product."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3, bias=False)
        self.log_scale = nn.Parameter(torch.full((3,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.log_scale.clamp(max=4.6).exp()


def test_a_computation_on_parameters_alone_is_a_constant_not_a_captured_call() -> None:
    torch.manual_seed(0)
    model = init_weights(LogScale().to(DTYPE))
    capture = FunctionalCapture()
    with composites.EpsilonPlus(canonizers=[capture]).context(model):
        model(vectors().requires_grad_(True))
        ops = capture.ops(model)
    assert list(ops) == ["mul"]
    output, relevance = Gradient(model, composites.EpsilonPlus())(vectors())
    assert_conserved(output, relevance, rtol=1e-4)


class ElementwiseNet(nn.Module):
    """``lin -> f -> lin`` for an element-wise function ``f`` of one activation."""

    FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "squared_relu": lambda h: 0.5 * F.relu(h) ** 2,  # StarReLU's core
        "neg": lambda h: -h,
        "exp": torch.exp,
        "abs": torch.abs,
        "square": torch.square,
        "sqrt_abs": lambda h: h.abs().sqrt(),
    }

    def __init__(self, function: str) -> None:
        super().__init__()
        self.function = self.FUNCTIONS[function]
        self.first, self.last = nn.Linear(4, 6, bias=False), nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.function(self.first(x)))


@pytest.mark.parametrize("function", list(ElementwiseNet.FUNCTIONS))
def test_element_wise_functions_pass_relevance(function: str) -> None:
    """As activations: relevance passes unchanged, so it is conserved (the gradient would scale or flip it)."""
    torch.manual_seed(0)
    model = init_weights(ElementwiseNet(function))
    composite = composites.EpsilonPlus(epsilon=1e-12, canonizers=[FunctionalCapture(stabilizer=1e-12)])
    output, relevance = Gradient(model, composite)(vectors())
    assert_conserved(output, relevance)


class AddCMul(nn.Module):
    """ResMLP's ``Affine``: ``torch.addcmul(beta, alpha, h)``, or the same written out."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.first, self.last = nn.Linear(4, 6, bias=False), nn.Linear(6, 3, bias=False)
        self.alpha, self.beta = nn.Parameter(torch.linspace(0.5, 1.5, 6)), nn.Parameter(torch.linspace(-0.2, 0.3, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        h = torch.addcmul(self.beta, self.alpha, h) if self.fused else self.beta + self.alpha * h
        return self.last(h)


def test_addcmul_is_explained_like_the_sum_of_a_product() -> None:
    composite = lambda: composites.EpsilonPlus(epsilon=1e-12, canonizers=[FunctionalCapture(stabilizer=1e-12)])  # noqa: E731
    results = []
    for fused in (True, False):
        torch.manual_seed(0)
        results.append(Gradient(init_weights(AddCMul(fused)), composite())(vectors()))
    assert torch.equal(results[0].output, results[1].output)
    torch.testing.assert_close(results[0].relevance, results[1].relevance, rtol=1e-7, atol=1e-10)  # stabilisers: one sum against two calls


def test_addcmul_of_two_activations_keeps_its_gradient() -> None:
    class Squares(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return torch.addcmul(h, h, h)

    capture = FunctionalCapture()
    model = Squares().to(DTYPE)
    with composites.EpsilonPlus(canonizers=[capture]).context(model):
        model(vectors().requires_grad_(True))
        assert type(capture.ops(model)["addcmul"]) is captured.Other


class FoldBack(nn.Module):
    """``F.unfold`` into overlapping 3x3 patches and ``F.fold`` back: every position summed up to 9 times."""

    positive = ("stem",)

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv3(1, 2)
        self.fc = nn.Linear(2 * 5 * 5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = F.unfold(self.stem(x), 3, padding=1)
        return self.fc(torch.flatten(F.fold(patches, (5, 5), 3, padding=1), 1))


def test_fold_splits_like_a_sum() -> None:
    """The gradient of ``fold`` copies each output's relevance to every patch that adds to it: 9x, not conserved."""
    model = build(FoldBack)
    output, relevance = Gradient(model, composites.EpsilonPlus())(images())
    assert_conserved(output, relevance)


class MixedGate(nn.Module):
    """ConViT's gated positional attention: two softmaxes mixed by ``sigmoid(self.gating)``, renormalised with ``/=``."""

    def __init__(self) -> None:
        super().__init__()
        self.scores, self.value, self.out = (nn.Linear(4, 4, bias=False) for _ in range(3))
        self.gating = nn.Parameter(torch.tensor(0.3))
        self.register_buffer("positional", torch.linspace(-1.0, 1.0, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        content = self.scores(x).softmax(dim=-1)
        attn = (1.0 - torch.sigmoid(self.gating)) * content + torch.sigmoid(self.gating) * self.positional.softmax(dim=-1)
        attn /= attn.sum(dim=-1).unsqueeze(-1)
        return self.out(attn * self.value(x))


def test_a_mix_of_gates_is_a_gate() -> None:
    """``attn`` is computed from gates and constants alone: the product gives all relevance to the value.

    Before, ``1 - sigmoid(self.gating)`` counted as an activation (and got the relevance of the
    content softmax's product), and the renormalised mix was no gate: half the relevance went
    into the softmaxes, whose gradient sums to zero.
    """
    torch.manual_seed(0)
    model = init_weights(MixedGate())
    composite = composites.EpsilonPlus(epsilon=1e-12, canonizers=[FunctionalCapture(stabilizer=1e-12)])
    output, relevance = Gradient(model, composite)(vectors())
    assert_conserved(output, relevance)


class TanhGated(nn.Module):
    """An activation written out with ``tanh`` (GPT-2's ``gelu_new``, Mish), or a gated unit."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.inner, self.out = nn.Linear(4, 6, bias=False), nn.Linear(6, 3, bias=False)
        self.gate_layer = nn.Linear(4, 6, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        if self.activation == "gelu_new":  # transformers' NewGELUActivation
            h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        elif self.activation == "mish":
            h = h * torch.tanh(F.softplus(h))
        elif self.activation == "wavenet":  # tanh(filter) * sigmoid(gate): the tanh is the signal
            h = torch.tanh(h) * torch.sigmoid(self.gate_layer(x))
        return self.out(h)


@pytest.mark.parametrize("activation", ["gelu_new", "mish"])
def test_an_activation_written_with_tanh_passes_relevance_like_its_module(activation: str) -> None:
    """``x * (1 + tanh(z)) / 2`` and ``x * tanh(softplus(x))``: the tanh factor is a gate.

    Before, the product split relevance in half between ``x`` and the tanh factor, whose sum with
    the constant 1 absorbed most of its half: GPT-2, ALBERT and Phi (transformers) lost
    0.4-1.6 % of the relevance.
    """
    torch.manual_seed(0)
    model = init_weights(TanhGated(activation))
    modules = {"gelu_new": nn.GELU(approximate="tanh"), "mish": nn.Mish()}
    as_module = copy.deepcopy(model)
    as_module.activation = "module"
    as_module.inner = nn.Sequential(model.inner, modules[activation])
    composite = composites.EpsilonPlus(epsilon=1e-12, canonizers=[FunctionalCapture(stabilizer=1e-12)])
    output, relevance = Gradient(model, composite)(vectors())
    expected_output, expected = Gradient(as_module, composite)(vectors())
    torch.testing.assert_close(output, expected_output, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(relevance, expected, rtol=1e-9, atol=1e-12)
    assert_conserved(output, relevance)


class Detached(nn.Module):
    """``layer(x).detach()``: a constant for the capture."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).detach()


def test_tanh_next_to_a_sigmoid_is_the_signal() -> None:
    """``tanh(a) * sigmoid(b)`` (WaveNet's gated unit, an LSTM's ``o * tanh(c)``): the sigmoid gates.

    The same as with the sigmoid's output detached, a constant factor: all relevance goes through
    the tanh (Arras et al. 2017, LRP for LSTMs).
    """
    torch.manual_seed(0)
    model = init_weights(TanhGated("wavenet"))
    detached = copy.deepcopy(model)
    detached.gate_layer = Detached(detached.gate_layer)
    composite = composites.EpsilonPlus(epsilon=1e-12, canonizers=[FunctionalCapture(stabilizer=1e-12)])
    output, relevance = Gradient(model, composite)(vectors())
    _, expected = Gradient(detached, composite)(vectors())
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)
    assert_conserved(output, relevance)


class ScatteredExperts(nn.Module):
    """A mixture of experts: rows routed to two experts, their outputs added back with ``index_add_`` / ``scatter_add``."""

    def __init__(self, scatter: bool) -> None:
        super().__init__()
        self.scatter = scatter
        self.experts = nn.ModuleList(nn.Linear(4, 4, bias=False) for _ in range(2))
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.permute(1, 0, 2).flatten(1) if x.dim() == 3 else x  # (batch, 4)
        combined = torch.zeros_like(rows)
        for expert, routed in zip(self.experts, ([0, 2], [0, 1])):
            index = torch.tensor(routed)
            if self.scatter:
                combined = combined.scatter_add(0, index.unsqueeze(1).expand(-1, 4), expert(rows[index]))
            else:
                combined.index_add_(0, index, expert(rows[index]))
        return self.head(combined)


@pytest.mark.parametrize("scatter", [False, True], ids=["index_add_", "scatter_add"])
def test_index_add_and_scatter_add_split_like_a_sum(scatter: bool) -> None:
    """Row 0 gets both experts' outputs: the gradient gave each of them its whole relevance.

    Mixtral's experts (transformers, eager) add their outputs with ``index_add_``: 3e-4 of the
    relevance was counted twice in a two-layer model.
    """
    torch.manual_seed(0)
    model = init_weights(ScatteredExperts(scatter))
    capture = FunctionalCapture(stabilizer=1e-12)
    composite = composites.EpsilonPlus(epsilon=1e-12, canonizers=[capture])
    with composite.context(model):
        model(vectors().requires_grad_(True))
        names = [name for name, op in capture.ops(model).items() if type(op) is captured.Add]
    assert names == (["scatter_add", "scatter_add_1"] if scatter else ["index_add", "index_add_1"])
    output, relevance = Gradient(model, composite)(vectors())
    assert_conserved(output, relevance)


#: A graph of 6 nodes (an edge list, both directions, and self loops) and its normalised adjacency.
GRAPH_EDGES = torch.tensor([[0, 1, 1, 2, 2, 3, 4, 5, 0, 3, 0, 1, 2, 3, 4, 5], [1, 0, 2, 1, 3, 2, 5, 4, 3, 0, 0, 1, 2, 3, 4, 5]])
#: How a graph convolution sums its messages, and the kind of call that does it.
AGGREGATIONS = {
    "torch.sparse.mm": captured.Product,
    "scatter_reduce sum": captured.Add,
    "scatter_reduce_ mean": captured.Pool,
    "scatter_reduce amax": captured.MaxPool,
    "index_put_ accumulate": captured.Add,
    "index_reduce_ mean": captured.Pool,
}


class GraphConvolution(nn.Module):
    """Two graph convolutions (Kipf and Welling 2017) written as graph libraries write them, a mean over the nodes."""

    def __init__(self, aggregation: str) -> None:
        super().__init__()
        self.aggregation = aggregation
        self.first, self.second, self.head = nn.Linear(4, 5, bias=False), nn.Linear(5, 5, bias=False), nn.Linear(5, 3, bias=False)
        source, target = GRAPH_EDGES
        degree = torch.bincount(target, minlength=6).to(DTYPE)
        self.register_buffer("source", source)
        self.register_buffer("target", target)
        self.register_buffer("norm", (degree[source] * degree[target]).rsqrt())
        self.register_buffer("adjacency", torch.sparse_coo_tensor(GRAPH_EDGES.flip(0), self.norm, (6, 6), check_invariants=True).coalesce())

    def propagate(self, features: torch.Tensor) -> torch.Tensor:
        messages = features[self.source] * self.norm[:, None]
        index = self.target[:, None].expand_as(messages)
        zeros = torch.zeros_like(features)
        if self.aggregation == "torch.sparse.mm":
            return torch.sparse.mm(self.adjacency, features)
        if self.aggregation == "scatter_reduce sum":
            return zeros.scatter_reduce(0, index, messages, reduce="sum")
        if self.aggregation == "scatter_reduce_ mean":
            return zeros.scatter_reduce_(0, index, messages, "mean", include_self=False)
        if self.aggregation == "scatter_reduce amax":
            return zeros.scatter_reduce(0, index, messages, reduce="amax", include_self=False)
        if self.aggregation == "index_put_ accumulate":
            return zeros.index_put_((self.target,), messages, accumulate=True)
        return zeros.index_reduce_(0, self.target, messages, "mean", include_self=False)

    def forward(self, nodes: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.propagate(self.first(nodes)))
        return self.head(self.propagate(self.second(hidden)).mean(dim=0, keepdim=True))


@pytest.mark.filterwarnings("ignore:index_reduce.. is in beta:UserWarning")
@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
def test_graph_convolutions_conserve_relevance_however_they_sum_messages(aggregation: str) -> None:
    """The sums of a graph network's messages split like a sum, ``torch.sparse.mm`` like ``mm``.

    Before, ``scatter_reduce`` and ``index_put_(accumulate=True)`` kept their gradient, which gave
    every message its node's whole relevance (6x the logit after two layers), ``index_reduce_``
    and an in-place ``scatter_reduce_`` ran uncaptured, and ``torch.sparse.mm``'s gradient lost 4 %.
    """
    torch.manual_seed(0)
    model = init_weights(GraphConvolution(aggregation))
    nodes = torch.rand(6, 4, generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    capture = FunctionalCapture(stabilizer=1e-12)
    composite = composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12, canonizers=[capture])
    with torch.no_grad():
        expected = model(nodes)
    with composite.context(model):
        model(nodes.clone().requires_grad_(True))
        kinds = {type(op) for name, op in capture.ops(model).items() if name.startswith(("_sparse_mm", "scatter", "index"))}
    assert kinds == {AGGREGATIONS[aggregation]}, capture.ops(model)
    output, relevance = Gradient(model, composite)(nodes, target=0)
    torch.testing.assert_close(output, expected, rtol=0.0, atol=0.0)
    assert float(relevance.sum()) == pytest.approx(float(output[0, 0]), rel=1e-9)


class ChunkedHead(nn.Module):
    """``chunk`` into three and use one: the other outputs of the chunk get no relevance at all."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(4, 6, bias=False), nn.Linear(2, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, value = self.lin(x).chunk(3, dim=1)
        return self.out(value)


def test_describe_a_call_whose_other_outputs_get_no_relevance() -> None:
    """A hook on an unused output of a multi-output call receives ``None``; describe raised on it."""
    torch.manual_seed(0)
    model = ChunkedHead().to(DTYPE)
    table = lrpkit.describe(model, vectors(), composite="epsilon_plus")
    rows = {row.name: row for row in table.rows}
    assert rows["lin"].relevance == pytest.approx(table.relevance.sum().item(), rel=1e-4)  # the stabiliser's share


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_a_rule_on_the_root_module_leaves_no_mode_behind(layer: str) -> None:
    """A model that is one layer with a rule: its capture is paused while it runs, then closed in order.

    The root's ``_pop`` has to put the paused mode back before the root's exit takes it off;
    the other way round, the first explanation raised and left the mode on the stack for good.
    """
    torch.manual_seed(0)
    model = (nn.Linear(4, 3) if layer == "linear" else nn.Conv2d(4, 3, 1)).to(DTYPE).eval()
    x = torch.rand(2, 4, dtype=DTYPE) if layer == "linear" else torch.rand(2, 4, 3, 3, dtype=DTYPE)
    plain = Gradient(model, composites.EpsilonPlus(canonizers=[]))(x, target=1).relevance
    for _ in range(2):  # the first call merges BatchNorms lazily (a probe forward), the second not
        relevance = Gradient(model, composites.EpsilonPlus())(x, target=1).relevance
        assert torch._C._len_torch_function_stack() == 0
        torch.testing.assert_close(relevance, plain, rtol=1e-12, atol=1e-12)
    assert hooks_left(model) == []


def test_a_torch_fx_traced_model_is_explained_like_the_original() -> None:
    """``torch.fx`` code calls ``operator.add``, ``torch.relu`` and ``torch.flatten``: captured alike."""
    model = build(Residual)
    traced = torch.fx.symbolic_trace(model)
    x = images()
    for composite in (composites.EpsilonPlusFlat, composites.EpsilonAlpha2Beta1):
        expected = Gradient(model, composite())(x, target=0).relevance
        torch.testing.assert_close(Gradient(traced, composite())(x, target=0).relevance, expected, rtol=1e-12, atol=1e-12)
    names = [row.name for row in lrpkit.describe(traced, x).rows]
    assert "add" in names and "relu" in names, names


# -- group, instance and RMS normalisation: the standard deviation held constant ---------------------


def _grouped_sigma(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    return torch.sqrt(x.reshape(x.shape[0], groups, -1).var(-1, unbiased=False, keepdim=True) + eps)


def _centred_groups(inputs: torch.Tensor, groups: int, sigma: torch.Tensor) -> torch.Tensor:
    grouped = inputs.reshape(inputs.shape[0], groups, -1)
    return ((grouped - grouped.mean(-1, keepdim=True)) / sigma).reshape(inputs.shape)


def normalization_reference(norm: nn.Module, x: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """Epsilon on the normalisation with its statistics' standard deviation as a constant (dense Jacobian)."""
    weight = norm.weight.detach()
    if isinstance(norm, nn.GroupNorm):
        sigma = _grouped_sigma(x, norm.num_groups, norm.eps)
        linear_part = lambda inputs: _centred_groups(inputs, norm.num_groups, sigma) * weight.view(1, -1, 1, 1)  # noqa: E731
    elif isinstance(norm, nn.InstanceNorm2d) and not norm.track_running_stats:
        sigma = _grouped_sigma(x, x.shape[1], norm.eps)
        linear_part = lambda inputs: _centred_groups(inputs, x.shape[1], sigma) * weight.view(1, -1, 1, 1)  # noqa: E731
    elif isinstance(norm, nn.InstanceNorm2d):  # running statistics: an affine map per channel
        std = torch.sqrt(norm.running_var + norm.eps).view(1, -1, 1, 1)
        linear_part = lambda inputs: inputs / std * weight.view(1, -1, 1, 1)  # noqa: E731
    else:  # RMSNorm over the last dimension
        rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        linear_part = lambda inputs: inputs / rms * weight  # noqa: E731
    return jacobian_epsilon(linear_part, x, norm(x).detach(), relevance)


def jacobian_epsilon(linear_part: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, output: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    jacobian = torch.autograd.functional.jacobian(linear_part, x).reshape(x.numel(), x.numel())
    scaled = (relevance / stabilize(output)).reshape(-1)
    return x * (jacobian.T @ scaled).reshape(x.shape)


NORMALIZATIONS: dict[str, Callable[[], nn.Module]] = {
    "group": lambda: nn.GroupNorm(3, 6, eps=1e-3),
    "instance": lambda: nn.InstanceNorm2d(6, affine=True, eps=1e-3),
    "instance, running statistics": lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True, eps=1e-3),
    "rms": lambda: nn.RMSNorm(5, eps=1e-3),
}


@pytest.mark.parametrize("how", ["module-rule", "captured-inside-module"])
@pytest.mark.parametrize("kind", list(NORMALIZATIONS))
def test_layer_norm_constant_on_group_instance_and_rms_norm(kind: str, how: str) -> None:
    torch.manual_seed(0)
    norm = NORMALIZATIONS[kind]().to(DTYPE).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
        if getattr(norm, "running_var", None) is not None:
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    x = _random(2, 4, 3, 5, seed=5) if kind == "rms" else _random(2, 6, 3, 3, seed=5)
    relevance = _random(*x.shape, seed=6)
    model = nn.Sequential(norm)
    if how == "module-rule":
        composite = composites.LayerMapComposite([(type(norm), rules.LayerNormConstant())], canonizers=[])
    else:
        composite = composites.EpsilonPlus()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explained: no UncoveredModuleWarning
        table = lrpkit.describe(model, x, composite=composite, target=relevance)
    rows = {row.name: row.rule for row in table.rows}
    captured_name = "0.rms_norm" if kind == "rms" else "0.group_norm" if kind == "group" else "0.instance_norm"
    assert rows["0" if how == "module-rule" else captured_name].startswith("LayerNormConstant(")
    torch.testing.assert_close(table.relevance, normalization_reference(norm, x, relevance), rtol=1e-10, atol=1e-12)


def test_a_group_normalised_network_conserves_relevance() -> None:
    """Before GroupNorm had a rule, its gradient sent almost no relevance through (sums near 1e-7)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.GroupNorm(2, 6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.InstanceNorm2d(6, affine=True), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3, bias=False),
    ).to(DTYPE).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.InstanceNorm2d)):
                module.weight.uniform_(0.5, 1.5)
                module.bias.zero_()
    output, relevance = Gradient(model, composites.EpsilonPlus(epsilon=1e-9, stabilizer=1e-9, canonizers=[FunctionalCapture(stabilizer=1e-9)]))(images(), target=0)
    torch.testing.assert_close(relevance.flatten(1).sum(1), output[:, 0], rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((torch.ones(2), torch.ones(2)), {}),
        ((torch.ones(2), 1, 2.0, None, True), {"dim": -1, "keepdim": True}),
        ((torch.ones(2),), {"dtype": torch.float64, "device": torch.device("cpu")}),
        (([torch.ones(2), torch.ones(2)],), {"dim": 0}),  # a container: pytree's own path
        ((torch.ones(2), torch.Size([2])), {}),  # torch.Size is a pytree node
        ((), {}),
    ],
)
def test_the_fast_flattening_of_a_call_matches_pytree(args: tuple, kwargs: dict) -> None:
    leaves, spec = _flatten_call(args, kwargs)
    expected_leaves, expected_spec = pytree.tree_flatten((args, kwargs))
    assert spec == expected_spec
    assert len(leaves) == len(expected_leaves) and all(ours is theirs for ours, theirs in zip(leaves, expected_leaves))
    rebuilt_args, rebuilt_kwargs = pytree.tree_unflatten(leaves, spec)
    assert len(rebuilt_args) == len(args) and list(rebuilt_kwargs) == list(kwargs)


class SwitchesOp(nn.Module):
    """The call site ``pow`` is an element-wise function of one activation, or (``mixed``) of two."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 3)
        self.mixed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.layer(x)) + 1
        return torch.pow(hidden, x) if self.mixed else torch.pow(hidden, 2)


def test_call_sites_keep_their_object_between_contexts() -> None:
    """As the model's own modules do; a call site whose kind changed gets a new object."""
    model = SwitchesOp().double()
    composite = composites.EpsilonPlus()
    (capture,) = [canonizer for canonizer in composite.canonizers if isinstance(canonizer, FunctionalCapture)]
    x = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    seen = []
    for mixed in (False, False, True):
        model.mixed = mixed
        with composite.context(model):
            model(x)
            seen.append(capture.ops(model))
    assert seen[0]["pow"] is seen[1]["pow"] and isinstance(seen[0]["pow"], captured.Activation)
    assert isinstance(seen[2]["pow"], captured.Other)
    assert seen[0]["add"] is seen[2]["add"]
    assert hooks_left(model) == []


class CosineClassifier(nn.Module):
    """Features normalised to unit length, then a dense layer: a cosine classifier (scaled)."""

    positive = ()

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(25, 8, bias=False), nn.ReLU(), nn.Linear(8, 5, bias=False))
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * self.head(F.normalize(self.features(x), dim=1))


def test_normalize_holds_the_norm_constant() -> None:
    """``F.normalize`` is captured as ``Normalize`` with ``Pass``: each element keeps its relevance.

    Its gradient (the control, with the call mapped to no rule) is orthogonal to the features and
    breaks conservation.
    """
    model = build(CosineClassifier)
    x = images()
    result = Gradient(model, composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12))(x, record=["normalize", "head"])
    rows = {row.name: row for row in lrpkit.describe(model, x, composites.EpsilonPlus())}
    assert (rows["normalize"].kind, rows["normalize"].rule) == ("Normalize: normalize", "Pass()")
    assert torch.allclose(result.intermediate["normalize"], result.intermediate["head"], rtol=1e-12, atol=1e-14)
    assert_conserved(result.output, result.relevance, rtol=1e-8)
    gradient_there = FunctionalCapture(stabilizer=1e-12, rules=[(captured.Normalize, None)])
    control = composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12, canonizers=[gradient_there])
    output, relevance = Gradient(model, control)(x)
    with pytest.raises(AssertionError):
        assert_conserved(output, relevance, rtol=1e-2)


class Clamped(nn.Module):
    """Two dense layers with ``x.clamp(low, high)`` between them, or the module that computes the same."""

    positive = ()

    def __init__(self, low: float | None = 0.0, high: float | None = 6.0, module: bool = False) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(25, 12), nn.Linear(12, 4)
        self.low, self.high = low, high
        self.activation = (nn.ReLU6() if high is not None else nn.ReLU()) if module else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = 20.0 * self.first(x.flatten(1))
        hidden = self.activation(hidden) if self.activation is not None else hidden.clamp(self.low, self.high)
        return self.second(hidden)


@pytest.mark.parametrize(("low", "high"), [(0.0, 6.0), (0.0, None)], ids=["relu6", "relu"])
def test_clamp_passes_relevance_as_the_activation_module(low: float, high: float | None) -> None:
    """``x.clamp(0, 6)`` is explained as ``nn.ReLU6``, ``x.clamp(min=0)`` as ``nn.ReLU`` (``Pass``).

    As a gradient the clamp would drop the relevance of the values clipped at 6.
    """
    torch.manual_seed(0)
    functional = Clamped(low, high).double().eval()
    module = copy.deepcopy(functional)
    module.activation = nn.ReLU6() if high is not None else nn.ReLU()
    x = images(batch=4)
    composite = composites.EpsilonPlus()
    result = Gradient(functional, composite)(x)
    expected = Gradient(module, composite)(x)
    assert torch.equal(result.output, expected.output)
    assert torch.allclose(result.relevance, expected.relevance, rtol=1e-12, atol=1e-15)
    rows = {row.name: row for row in lrpkit.describe(functional, x, composite)}
    assert (rows["clamp"].kind, rows["clamp"].rule) == ("Activation: clamp", "Pass()")
    if high is not None:
        assert (20.0 * functional.first(x.flatten(1)) > 6.0).any()  # some values are clipped at 6


def test_clamp_with_a_bound_that_is_an_activation_is_another_call() -> None:
    class Bounded(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clamp(max=x.mean(dim=1, keepdim=True)).sum(dim=1, keepdim=True)

    rows = {row.name: row for row in lrpkit.describe(Bounded(), torch.rand(2, 3, dtype=DTYPE), "epsilon_plus", target=0)}
    assert rows["clamp"].kind == "Other: clamp"


class WrittenOutSoftmaxAttention(nn.Module):
    """Self-attention whose softmax is ``torch.softmax`` or written out with ``exp``, as some
    research code does (``e = exp(s - max(s))``, ``e / sum(e)``), or ``exp`` as a decay (``exp(-s)``)."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.query, self.key, self.value = (nn.Linear(4, 4, bias=False) for _ in range(3))
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.query(x) @ self.key(x).transpose(1, 2) / 2
        if self.form == "softmax":
            weights = scores.softmax(dim=-1)
        elif self.form == "exp":
            exponentials = (scores - scores.amax(dim=-1, keepdim=True)).exp()
            weights = exponentials / exponentials.sum(dim=-1, keepdim=True)
        else:  # "decay": weights of exp(-softplus(s)), no normalisation
            weights = torch.exp(-F.softplus(scores))
        return self.head((weights @ self.value(x)).mean(dim=1))


@pytest.mark.parametrize("form", ["exp", "decay"])
def test_an_exp_output_is_a_gate(form: str) -> None:
    """An ``exp`` output multiplying a signal is a gate, as a softmax or a sigmoid output is.

    Before, the attention weights written out with ``exp`` were a second signal: they took half
    the relevance of each product and lost part of it through ``exp``, the subtraction of the
    maximum and the sum (1-8 % of the logit).
    """
    torch.manual_seed(0)
    model = init_weights(WrittenOutSoftmaxAttention(form))
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    rows = assert_explained_conserved(model, x, composites.EpsilonPlus(epsilon=TINY, stabilizer=TINY, canonizers=[tiny_capture()]))
    assert rows["query"].relevance in (None, 0.0) and rows["key"].relevance in (None, 0.0)
    if form == "exp":  # the same numbers as with torch.softmax
        reference = init_weights(WrittenOutSoftmaxAttention("softmax"))
        composite = composites.EpsilonPlus(epsilon=TINY, stabilizer=TINY, canonizers=[tiny_capture()])
        torch.testing.assert_close(Gradient(model, composite)(x).relevance, Gradient(reference, composite)(x).relevance)


class RenormalisedAttention(nn.Module):
    """Attention whose weights are rescaled by ``1 / max(column sums)``: a value computed from the
    gate through calls without a rule (``max``, ``1 / x``), as Nystromformer's pseudo-inverse."""

    positive = ()

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Linear(4, 4, bias=False)
        self.value = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = (self.query(x) @ x.transpose(1, 2)).softmax(dim=-1)
        scale = 1 / gate.sum(dim=-2).max()
        return self.head(((scale * gate) @ self.value(x)).mean(dim=1))


def test_values_computed_from_gates_through_calls_without_rules_stay_gates() -> None:
    """``scale * gate`` is a product of two gates: the attention output's relevance goes to the values only."""
    model = build(RenormalisedAttention)
    x = torch.randn(3, 5, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    composite = composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12)
    output, relevance = Gradient(model, composite)(x)
    assert_conserved(output, relevance, rtol=1e-8)
    rows = {row.name: row for row in lrpkit.describe(model, x, composite)}
    assert rows["rdiv"].relevance is None and rows["max"].relevance is None
    assert rows["value"].relevance is not None


class ConvGLU(nn.Module):
    """A conformer-like convolution module: a pointwise convolution to twice the channels, ``nn.GLU``
    (or the same written out, ``a * sigmoid(b)``), a convolution, a dense head."""

    positive = ()

    def __init__(self, written_out: bool = False) -> None:
        super().__init__()
        self.pointwise = nn.Conv1d(4, 8, 1, bias=False)
        self.glu = nn.GLU(dim=1)
        self.conv = nn.Conv1d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4, 2, bias=False)
        self.written_out = written_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.pointwise(x)
        if self.written_out:
            signal, gate = hidden.chunk(2, dim=1)
            hidden = signal * torch.sigmoid(gate)
        else:
            hidden = self.glu(hidden)
        return self.head(self.conv(hidden).mean(dim=-1))


def test_glu_is_explained_as_the_product_it_stands_for() -> None:
    """``nn.GLU`` gives the same output and relevance as ``a * sigmoid(b)`` written out: the gate half gets none."""
    model = build(ConvGLU)
    written_out = copy.deepcopy(model)
    written_out.written_out = True
    x = torch.rand(3, 4, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    composite = composites.EpsilonGammaBox(low=0.0, high=1.0, epsilon=1e-12, stabilizer=1e-12)
    result, expected = Gradient(model, composite)(x), Gradient(written_out, composite)(x)
    assert torch.equal(result.output, expected.output)
    assert torch.allclose(result.relevance, expected.relevance, rtol=1e-12, atol=1e-15)
    rows = {row.name: row for row in lrpkit.describe(model, x, composite)}
    assert rows["glu.sigmoid"].relevance is None and rows["glu.mul"].rule.startswith("Product")
    assert_conserved(result.output, result.relevance, rtol=1e-8)


class GlobalFilter(nn.Module):
    """GFNet's token mixing: ``irfft2(rfft2(x) * w)`` with a learned complex filter ``w`` (a parameter)."""

    positive = ()

    def __init__(self, magnitude: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.filter = nn.Parameter(torch.randn(5, 3, 4, 2) * 0.5)
        self.head = nn.Linear(4, 2, bias=False)
        self.magnitude = magnitude

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, 5, 4, 4), channels last
        spectrum = torch.fft.rfft2(self.embed(x), dim=(1, 2), norm="ortho") * torch.view_as_complex(self.filter)
        mixed = spectrum.abs() if self.magnitude else torch.fft.irfft2(spectrum, s=(5, 4), dim=(1, 2), norm="ortho")
        return self.head(mixed.mean(dim=(1, 2)))


def test_a_fourier_filter_is_one_linear_map() -> None:
    """The transforms and the filter between them are one captured call with ``Norm``: conserved, and the
    filter's module is covered (its parameter enters that call); without a way back to real values
    (``abs``, not linear) the chain keeps its gradient."""
    model = build(GlobalFilter)
    x = torch.randn(3, 5, 4, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    composite = composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12)
    rows = assert_explained_conserved(model, x, composite)
    assert (rows["fft_irfft2"].kind, rows["fft_irfft2"].rule) == ("Fourier: fft_irfft2", "Norm(stabilizer=1e-12)")
    model.magnitude = True
    output, relevance = Gradient(model, composite)(x)
    assert torch.isfinite(relevance).all()


class SpectralLayer(nn.Module):
    """A Fourier neural operator's layer (Li et al. 2021): ``irfft(out_ft)``, where ``out_ft`` is a zero
    spectrum into which the lowest modes of ``rfft(x)`` are written, mixed across channels by a
    learned complex weight per mode, beside a 1x1 convolution."""

    def __init__(self, channels: int = 4, modes: int = 3, write_into: str = "zeros") -> None:
        super().__init__()
        self.modes, self.write_into = modes, write_into
        self.weight = nn.Parameter(torch.randn(channels, channels, modes, 2) / channels)  # complex, as real pairs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = torch.fft.rfft(x)
        if self.write_into == "zeros":
            out_ft = torch.zeros(x.shape[0], self.weight.shape[1], x.shape[-1] // 2 + 1, dtype=spectrum.dtype)
        else:  # a tensor computed from the activation otherwise: not one linear map of it
            out_ft = torch.fft.rfft(x.relu())
        weight = torch.view_as_complex(self.weight)
        out_ft[:, :, : self.modes] = torch.einsum("bix,iox->box", spectrum[:, :, : self.modes], weight)
        out_ft[:, :, -1:] = spectrum[:, :, -1:] * 0.5
        return torch.fft.irfft(out_ft, n=x.shape[-1])


class FourierOperator(nn.Module):
    positive = ()

    def __init__(self, write_into: str = "zeros") -> None:
        super().__init__()
        self.lift = nn.Conv1d(2, 4, 1, bias=False)
        self.spectral = SpectralLayer(write_into=write_into)
        self.local = nn.Conv1d(4, 4, 1, bias=False)
        self.head = nn.Linear(4 * 8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lift(x)
        return self.head(torch.relu(self.spectral(h) + self.local(h)).flatten(1))


def test_a_fourier_operator_writing_its_modes_into_a_zero_spectrum_is_one_linear_map() -> None:
    """``out_ft[..., :modes] = einsum(x_ft[..., :modes], w)`` into a zero spectrum, then ``irfft``: one
    captured call with ``Norm``, conserved, its module covered (the weight enters the chain). As a
    gradient the chain lost 0.4-1.5 % of the relevance (and z+ around it more)."""
    torch.manual_seed(0)  # (the 1x1 convolutions and the spectral weight keep torch's initialisation)
    model = build(FourierOperator)
    x = torch.rand(3, 2, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    composite = composites.EpsilonGammaBox(low=0.0, high=1.0, epsilon=1e-12, stabilizer=1e-12)
    rows = assert_explained_conserved(model, x, composite)
    assert (rows["spectral.fft_irfft"].kind, rows["spectral.fft_irfft"].rule) == ("Fourier: fft_irfft", "Norm(stabilizer=1e-12)")
    other = build(lambda: FourierOperator(write_into="computed"))
    other.load_state_dict(model.state_dict())
    rows = {row.name: row for row in lrpkit.describe(other, x, composite)}
    assert "spectral.fft_irfft" not in rows  # its gradient, as before
    assert torch.isfinite(Gradient(other, composite)(x).relevance).all()


class SpatialTransformer(nn.Module):
    """A spatial transformer (Jaderberg et al. 2015): a localisation network computes ``theta``, the input
    is sampled on ``affine_grid(theta)`` with ``F.grid_sample``, then classified. ``sample_constant``:
    a learned table is sampled where the input says instead (no linear map of an activation)."""

    positive = ()

    def __init__(self, sample_constant: bool = False) -> None:
        super().__init__()
        self.sample_constant = sample_constant
        self.localisation = nn.Sequential(nn.Flatten(), nn.Linear(36, 6, bias=False))
        self.table = nn.Parameter(torch.randn(1, 1, 6, 6))
        self.conv = nn.Conv2d(1, 3, 3, padding=1, bias=False)
        self.head = nn.Linear(3 * 36, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=x.dtype)
        theta = self.localisation(x).view(-1, 2, 3) * 0.1 + identity
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        source = self.table.expand(x.shape[0], 1, 6, 6) if self.sample_constant else x
        sampled = F.grid_sample(source, grid, align_corners=False)
        return self.head(torch.relu(self.conv(sampled if not self.sample_constant else sampled + x)).flatten(1))


def test_a_spatial_transformer_samples_relevance_back_to_its_input() -> None:
    """``F.grid_sample(x, grid)`` is a linear map of ``x`` for its grid (``Resample``, ``Norm``): all
    relevance reaches the input there, none goes into the grid's localisation network, as none
    goes into attention weights. As a gradient, 10-70 % of the relevance was lost or made up."""
    torch.manual_seed(0)
    model = build(SpatialTransformer)
    x = images(channels=1, size=6)
    composite = composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12)
    rows = assert_explained_conserved(model, x, composite)
    assert (rows["grid_sample"].kind, rows["grid_sample"].rule) == ("Resample: grid_sample", "Norm(stabilizer=1e-12)")
    assert not rows["localisation.1"].relevance  # (none reached it)
    # z^B and flat on the convolution after it keep relevance off the zeros sampled outside the image
    for first in (rules.ZBox(0.0, 1.0, stabilizer=1e-12), rules.Flat(stabilizer=1e-12)):
        special = composites.SpecialFirstLayerMapComposite(
            [*composites.layer_map_base(stabilizer=1e-12), (types.AnyLinear, rules.Epsilon(epsilon=1e-12))],
            [(types.Convolution, first)], canonizers=[FunctionalCapture(stabilizer=1e-12)])
        output, relevance = Gradient(model, special)(x)
        assert_conserved(output, relevance, rtol=1e-8)
    constant = build(lambda: SpatialTransformer(sample_constant=True))
    with pytest.warns(composites.UncoveredModuleWarning, match="SpatialTransformer"):  # its table keeps the gradient
        rows = {row.name: row for row in lrpkit.describe(constant, x, composite)}
        assert rows["grid_sample"].kind == "Other: grid_sample"  # a table sampled where the input says: its gradient
        assert torch.isfinite(Gradient(constant, composite)(x).relevance).all()


class DeformableAttention(nn.Module):
    """Deformable attention (Zhu et al. 2021), one level and one query: the value map is sampled
    with ``F.grid_sample`` at points the query predicts, and the samples are weighted by a softmax."""

    positive = ()

    def __init__(self, width: int = 6, points: int = 4) -> None:
        super().__init__()
        self.points = points
        self.value = nn.Conv2d(1, width, 1, bias=False)
        self.offsets = nn.Linear(width, 2 * points, bias=False)
        self.weights = nn.Linear(width, points, bias=False)
        self.head = nn.Linear(width, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = self.value(x)
        query = values.flatten(2).mean(-1)
        locations = torch.tanh(self.offsets(query)).view(-1, 1, self.points, 2)
        attention = self.weights(query).softmax(-1)
        sampled = F.grid_sample(values, locations, align_corners=False).squeeze(2)
        return self.head(torch.relu((sampled * attention.unsqueeze(1)).sum(-1)))


def test_deformable_attention_conserves() -> None:
    """Sampled values weighted by attention: ``Norm`` at the sampling, the locations and the
    weights held constant (gates), all relevance reaches the value map."""
    torch.manual_seed(0)
    model = build(DeformableAttention)
    x = images(channels=1, size=6)
    rows = assert_explained_conserved(model, x, composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12))
    assert rows["grid_sample"].kind == "Resample: grid_sample"


class RegionHead(nn.Module):
    """A detector's second stage in small: features, torchvision's ``roi_align`` of boxes the model
    computes from them (held constant, as proposals), a classifier per region."""

    positive = ()

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.boxes = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4 * 2 * 2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import roi_align

        features = torch.relu(self.features(x))
        corners = torch.sigmoid(self.boxes(features.mean(dim=(2, 3)))) * x.shape[-1]
        low, high = torch.minimum(corners[:, :2], corners[:, 2:]), torch.maximum(corners[:, :2], corners[:, 2:]) + 1
        boxes = torch.cat([torch.arange(x.shape[0], dtype=x.dtype)[:, None], low, high], dim=1)
        regions = roi_align(features, boxes, output_size=(2, 2), sampling_ratio=2, aligned=True)
        return self.head(regions.flatten(1))


def test_a_region_of_interest_is_pooled_back_to_its_features() -> None:
    """``roi_align`` is ``Resample`` (``Norm``) with its boxes held constant: conserved, and no warning
    about the custom autograd Function torchvision registers for it (its gradient, before: spread by
    the sampling weights alone, onto zero features too)."""
    torch.manual_seed(0)
    model = build(RegionHead)
    x = images(channels=1, size=6)
    assert_explained_conserved(model, x, composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12))


class ErfGELU(nn.Module):
    """Two dense layers with the exact GELU between them, written out with ``erf`` (as ESM does) or as ``nn.GELU``."""

    positive = ()

    def __init__(self, written_out: bool = True) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(25, 12, bias=False), nn.Linear(12, 4, bias=False)
        self.written_out = written_out
        self.gelu = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = 3.0 * self.first(x.flatten(1))
        if self.written_out:
            hidden = hidden * 0.5 * (1.0 + torch.erf(hidden / math.sqrt(2.0)))
        else:
            hidden = self.gelu(hidden)
        return self.second(hidden)


def test_erf_gelu_written_out_is_explained_as_the_module() -> None:
    """``erf`` is an activation and, like ``tanh``, a gate of the signal it multiplies: the written-out
    GELU passes all relevance to its input, as ``nn.GELU`` with ``Pass`` does (ESM lost 11 % before)."""
    model = build(ErfGELU)
    module = copy.deepcopy(model)
    module.written_out = False
    x = images(batch=4)
    composite = composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12)
    result, expected = Gradient(model, composite)(x), Gradient(module, composite)(x)
    assert torch.allclose(result.output, expected.output, rtol=1e-12)
    assert torch.allclose(result.relevance, expected.relevance, rtol=1e-9, atol=1e-12)
    assert_conserved(result.output, result.relevance, rtol=1e-8)


class PaddedFirstLayer(nn.Module):
    """A first convolution with its input padded before it (TF-style "same" padding), or with its own padding.

    ``same``: as timm's ``Conv2dSame``, a ``nn.Conv2d`` whose own ``forward`` pads and calls
    ``F.conv2d`` (a captured layer call)."""

    positive = ()

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = (_Conv2dSame if how == "same" else nn.Conv2d)(3, 4, 3, padding=1 if how == "own" else 0, bias=False)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "explicit":
            x = F.pad(x, (1, 1, 1, 1))
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class _Conv2dSame(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


@pytest.mark.parametrize("how", ["explicit", "same"])
@pytest.mark.parametrize(
    "composite",
    [lambda: composites.EpsilonGammaBox(low=0.0, high=1.0), composites.EpsilonPlusFlat,
     lambda: composites.SpecialFirstLayerMapComposite(
         [*composites.layer_map_base(), (types.Linear, rules.Epsilon())], [(types.Convolution, rules.WSquare())])],
    ids=["zbox", "flat", "wsquare"],
)
def test_a_padded_first_layer_is_explained_as_one_with_its_own_padding(how: str, composite: Callable[[], Any]) -> None:
    """z^B, flat and w^2 give the constant of an explicit ``F.pad`` no relevance, as to a layer's own padding
    (they lost 20 % of it there before; HF's MobileNetV2, with TF-style padding, 4 %)."""
    own = build(lambda: PaddedFirstLayer("own"))
    padded = PaddedFirstLayer(how).to(DTYPE).eval()
    padded.load_state_dict(own.state_dict())
    x = images(channels=3, size=6)
    result, expected = Gradient(padded, composite())(x), Gradient(own, composite())(x)
    assert torch.allclose(result.output, expected.output, rtol=1e-12)
    assert torch.allclose(result.relevance, expected.relevance, rtol=1e-10, atol=1e-14)


#: The rules that give relevance to inputs for what they could have been (``reads_padding``).
FIRST_LAYER_RULES = [
    lambda: rules.ZBox(0.0, 1.0, stabilizer=TINY),
    lambda: rules.Flat(stabilizer=TINY),
    lambda: rules.WSquare(stabilizer=TINY),
]


def assert_first_layer_rule_conserves(model: nn.Module, x: torch.Tensor, first: rules.Rule, kind: type, rtol: float = 1e-10) -> None:
    """With ``first`` on the first layer of ``kind`` and negligible stabilisers, the relevance sums to the logit."""
    composite = composites.SpecialFirstLayerMapComposite(
        [*composites.layer_map_base(stabilizer=TINY), (types.AnyLinear, rules.Epsilon(epsilon=TINY))],
        [(kind, first)], canonizers=[tiny_capture()])
    classes = model(x).shape[1]
    result = Gradient(model, composite)(x, lambda output: output * F.one_hot(output.argmax(1), classes))
    logits = result.output.gather(1, result.output.argmax(1, keepdim=True)).squeeze(1)
    assert torch.allclose(result.relevance.reshape(len(x), -1).sum(dim=1), logits, rtol=rtol)


class ConstantsBesideTheInput(nn.Module):
    """A first dense layer on an input built with constants: MobileBERT's trigram input (the
    sequence shifted both ways, padded with zeros, concatenated along the features) or the input
    next to a constant tensor (``torch.cat([x, zeros])``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.dense = nn.Linear(12 if how == "trigram" else 6, 5, bias=False)
        self.head = nn.Linear(5, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, L, 4)
        if self.how == "trigram":
            x = torch.cat([F.pad(x[:, 1:], (0, 0, 0, 1)), x, F.pad(x[:, :-1], (0, 0, 1, 0))], dim=2)
        else:
            x = torch.cat([x, torch.zeros(*x.shape[:2], 2, dtype=x.dtype)], dim=-1)
        return self.head(torch.relu(self.dense(x)).mean(dim=1))


@pytest.mark.parametrize("how", ["trigram", "zeros"])
@pytest.mark.parametrize("first", FIRST_LAYER_RULES, ids=["zbox", "flat", "wsquare"])
def test_constants_concatenated_to_a_first_layer_input_get_no_relevance(how: str, first: Callable[[], rules.Rule]) -> None:
    """z^B, flat and w^2 keep relevance off the constants that ``torch.cat`` and ``F.pad`` put into a
    first layer's input: all of it reaches the real input (MobileBERT lost a third under
    EpsilonPlusFlat to its trigram padding)."""
    torch.manual_seed(0)
    model = ConstantsBesideTheInput(how).to(DTYPE).eval()
    x = torch.rand(2, 5, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    assert_first_layer_rule_conserves(model, x, first(), types.Linear)


class UnpooledInput(nn.Module):
    """A first convolution on a max-unpooled input (SegNet's decoder, here in front)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.head = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled, indices = F.max_pool2d(x, 2, return_indices=True)
        return self.head(torch.relu(self.conv(F.max_unpool2d(pooled, indices, 2))).mean(dim=(2, 3)))


@pytest.mark.parametrize("first", FIRST_LAYER_RULES, ids=["zbox", "flat", "wsquare"])
def test_zeros_of_a_max_unpooling_in_a_first_layer_input_get_no_relevance(first: Callable[[], rules.Rule]) -> None:
    """The positions a max unpooling fills with zeros are constants, as a padding's are: before,
    the relevance z^B, flat and w^2 gave them (for what they could have been) was lost in the
    unpooling's backward: 65-80 % of the logit, 126 % with w^2 in this model."""
    torch.manual_seed(0)
    model = UnpooledInput().to(DTYPE).eval()
    x = torch.rand(2, 2, 6, 6, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    assert_first_layer_rule_conserves(model, x, first(), types.Convolution)


class PreparedInside(nn.Module):
    """A first convolution on digits that the model itself resized, pooled or combined first."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how in ("nearest", "bilinear"):
            x = F.interpolate(x, scale_factor=2, mode=self.how)
        elif self.how == "pooled":
            x = F.avg_pool2d(x, 2, stride=1)
        elif self.how == "scaled":
            x = x * 0.5
        elif self.how == "summed":
            x = x + x.flip(-1)
        else:  # a difference: zero where both are, and where a digit is symmetric
            x = x - x.flip(-1)
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("how", ["nearest", "bilinear", "pooled", "scaled", "summed", "difference"])
@pytest.mark.parametrize("first", FIRST_LAYER_RULES, ids=["zbox", "flat", "wsquare"])
def test_relevance_at_zero_outputs_before_a_first_layer_is_split_by_the_weights(how: str, first: Callable[[], rules.Rule]) -> None:
    """z^B, flat and w^2 give relevance to the digits' background (half the pixels are exactly
    zero); the proportional split of a resampling, pooling, sum or product with a constant before
    the first layer is 0/0 there, and lost it (up to 39 % of the logit with EpsilonPlusFlat on
    upsampled digits). Split by the weights instead, all of it reaches the digits."""
    from lrpkit.digits import load_digits_tensors

    x = load_digits_tensors(dtype=DTYPE)[2][:6]
    assert float((x == 0).double().mean()) > 0.4
    torch.manual_seed(0)
    model = PreparedInside(how).to(DTYPE).eval()
    assert_first_layer_rule_conserves(model, x, first(), types.Convolution, rtol=1e-9)


def test_constant_positions_follow_pads_and_concatenations() -> None:
    x = torch.rand(1, 2, 3, requires_grad=True)
    trigram = torch.cat([F.pad(x[:, 1:], (0, 0, 0, 1)), x, F.pad(x[:, :-1], (0, 0, 1, 0))], dim=-1)
    expected = torch.zeros(1, 2, 9, dtype=torch.bool)
    expected[0, 1, :3] = expected[0, 0, 6:] = True
    assert torch.equal(core.constant_positions(trigram), expected)
    nested = F.pad(torch.cat([torch.ones(1, 2, 1), x], dim=2), (1, 0))  # a constant inside a padding
    assert core.constant_positions(nested)[0, 0].tolist() == [True, True, False, False, False]
    assert core.constant_positions(torch.cat([x, x * 2], dim=1)) is None
    assert core.constant_positions(F.pad(x, (-1, 0))) is None  # negative widths crop
    two_unknown = torch.cat([torch.zeros(1, 2, 1), x, torch.zeros(1, 2, 1)], dim=2)
    assert core.constant_positions(two_unknown) is None  # the constants' sizes are not recorded
    image = torch.tensor([[[[1.0, 5.0], [2.0, 3.0]]]], requires_grad=True)
    unpooled = F.max_unpool2d(*F.max_pool2d(image, 2, return_indices=True), 2)
    assert core.constant_positions(unpooled)[0, 0].tolist() == [[True, False], [True, True]]
