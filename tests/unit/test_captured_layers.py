"""Captured ``F.linear`` / ``F.conv*`` calls with constant weights are explained as the layers they are.

Models such as torchvision's Swin pass the weights of child modules to ``F.linear`` instead of
calling the modules. Such a call is a :class:`lrpkit.captured.Dense` (``Convolution``,
``ConvolutionTranspose``) and gets the composite's dense or convolution rule. The reference is
the same network written with modules: every preset must give the same relevance (float64,
1e-10), with the first-layer rules, ``zero_params``, keyword arguments, tuple settings, ``"same"``
padding and weights computed from parameters. A weight computed from the input, and a layer
module's own ``forward`` without a rule, stay plain gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import hooks_left
from lrpkit import captured, composites, rules, types
from lrpkit.attribution import Gradient
from lrpkit.canonizers import FunctionalCapture

DTYPE = torch.float64


class Modules(nn.Module):
    """conv (padding 1) -> relu -> conv (stride 2, padding (1, 0)) -> relu -> transposed conv -> relu -> dense -> relu -> dense."""

    def __init__(self, same: str | None = None) -> None:
        super().__init__()
        kernel, padding = (4, "same") if same == "asymmetric" else (3, "same" if same else 1)
        self.conv1 = nn.Conv2d(2, 4, kernel, padding=padding)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2, padding=(1, 0))
        self.up = nn.ConvTranspose2d(5, 3, 3, stride=2, output_padding=1)
        self.fc1 = nn.Linear(3 * 18 * 12, 6)
        self.fc2 = nn.Linear(6, 3, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        x = self.relu(self.up(x))
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


class Calls(nn.Module):
    """The same network, calling ``F.conv2d``, ``F.conv_transpose2d`` and ``F.linear`` with the modules' weights."""

    def __init__(self, layers: Modules) -> None:
        super().__init__()
        self.layers = layers  # its modules are never called: only their parameters are used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layers
        x = F.relu(F.conv2d(x, m.conv1.weight, m.conv1.bias, padding=m.conv1.padding))
        x = F.relu(F.conv2d(x, weight=m.conv2.weight, bias=m.conv2.bias, stride=(2, 2), padding=(1, 0)))
        x = F.relu(F.conv_transpose2d(x, m.up.weight, m.up.bias, 2, 0, 1))
        x = F.relu(F.linear(x.flatten(1), m.fc1.weight, bias=m.fc1.bias))
        return F.linear(x, m.fc2.weight)


def build(same: str | None = None) -> tuple[Modules, Calls]:
    torch.manual_seed(0)
    layers = Modules(same).to(DTYPE).eval()
    return layers, Calls(layers).eval()


def inputs() -> torch.Tensor:
    return torch.rand(3, 2, 16, 12, generator=torch.Generator().manual_seed(1), dtype=DTYPE)


PRESETS: dict[str, Callable[[], composites.Composite]] = {
    "EpsilonPlusFlat": lambda: composites.EpsilonPlusFlat(),
    "EpsilonGammaBox": lambda: composites.EpsilonGammaBox(low=0.0, high=1.0),
    "EpsilonAlpha2Beta1": lambda: composites.EpsilonAlpha2Beta1(),
    "EpsilonPlus, zero bias": lambda: composites.EpsilonPlus(zero_params="bias"),
    "Epsilon everywhere": lambda: composites.LayerMapComposite(composites.layer_map_base() + [(types.AnyLinear, rules.Epsilon())]),
    "WSquare everywhere": lambda: composites.LayerMapComposite(composites.layer_map_base() + [(types.AnyLinear, rules.WSquare())]),
}


def relevance(model: nn.Module, composite: composites.Composite, x: torch.Tensor) -> torch.Tensor:
    return Gradient(model, composite)(x, target=1).relevance


@pytest.mark.parametrize("preset", list(PRESETS))
def test_calls_are_explained_like_the_modules(preset: str) -> None:
    layers, calls = build()
    x = inputs()
    expected = relevance(layers, PRESETS[preset](), x)
    gradient = Gradient(layers)(x, target=1).relevance
    assert not torch.allclose(expected, gradient, rtol=1e-3)  # the rules act
    torch.testing.assert_close(relevance(calls, PRESETS[preset](), x), expected, rtol=1e-10, atol=1e-12)
    assert hooks_left(calls) == []


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("same", ["symmetric", "asymmetric"])
def test_same_padding(same: str) -> None:
    """``padding="same"``: symmetric as zero padding in closed form, asymmetric by re-running the call."""
    layers, calls = build(same)
    x = inputs()
    for preset in ("EpsilonPlus, zero bias", "EpsilonGammaBox"):
        expected = relevance(layers, PRESETS[preset](), x)
        torch.testing.assert_close(relevance(calls, PRESETS[preset](), x), expected, rtol=1e-10, atol=1e-12)


class Conv1dAnd3d(nn.Module):
    def __init__(self, modules: bool) -> None:
        super().__init__()
        self.modules_called = modules
        self.c1 = nn.Conv1d(2, 3, 3, padding=1)
        self.c3 = nn.Conv3d(3, 2, (1, 1, 3), padding=(0, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modules_called:
            y = torch.relu(self.c1(x))
            return self.c3(y[:, :, None, None, :]).flatten(1)
        y = torch.relu(F.conv1d(x, self.c1.weight, self.c1.bias, padding=1))
        return F.conv3d(y[:, :, None, None, :], self.c3.weight, self.c3.bias, padding=(0, 0, 1)).flatten(1)


class Holder(nn.Module):
    def __init__(self, modules: bool) -> None:
        super().__init__()
        self.net = Conv1dAnd3d(modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_conv1d_and_conv3d() -> None:
    torch.manual_seed(2)
    with_modules = Holder(True).to(DTYPE).eval()
    with_calls = Holder(False).to(DTYPE).eval()
    with_calls.load_state_dict(with_modules.state_dict())
    x = torch.rand(2, 2, 7, dtype=DTYPE)
    for preset in ("EpsilonPlusFlat", "EpsilonAlpha2Beta1"):
        expected = relevance(with_modules, PRESETS[preset](), x)
        # the calls are made by Conv1dAnd3d, which owns no parameter of its own children
        torch.testing.assert_close(relevance(with_calls, PRESETS[preset](), x), expected, rtol=1e-10, atol=1e-12)


class ScaledWeight(nn.Module):
    """A weight computed from parameters (``weight * gain``) is the layer's weight, not an input."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.gain = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.layer.weight * 2.0, self.layer.bias)


def test_a_weight_computed_from_parameters_belongs_to_the_layer() -> None:
    torch.manual_seed(3)
    model = ScaledWeight().to(DTYPE).eval()
    reference = nn.Linear(4, 3).to(DTYPE).eval()
    with torch.no_grad():
        reference.weight.copy_(model.layer.weight * 2.0)
        reference.bias.copy_(model.layer.bias)
    x = torch.randn(5, 4, dtype=DTYPE)
    composite = composites.LayerMapComposite([(types.Linear, rules.ZPlus())])
    expected = relevance(reference, composite, x)
    torch.testing.assert_close(relevance(model, composite, x), expected, rtol=1e-10, atol=1e-12)
    assert kinds(model, composite, x) == {"linear": captured.Dense}


class OwnBias(nn.Module):
    """BEiT's attention: a child's weight and a bias of its own (``cat`` of parameters) in one ``F.linear``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 6, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))
        self.register_buffer("k_bias", torch.zeros(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return F.linear(x, weight=self.qkv.weight, bias=bias)


class OwnLayer(nn.Module):
    """A custom layer module (no torch layer class) calling ``F.linear`` with its own weight and bias."""

    def __init__(self) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _as_linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    reference = nn.Linear(4, 6).to(DTYPE).eval()
    with torch.no_grad():
        reference.weight.copy_(weight)
        reference.bias.copy_(bias)
    return reference


@pytest.mark.parametrize("layer", [OwnBias, OwnLayer])
def test_a_call_with_parameters_of_the_running_module_is_a_layer(layer: type[nn.Module]) -> None:
    """Only a torch layer class keeps its own call (its rule is the composite's); BEiT lost 3e3x the logit before."""
    torch.manual_seed(5)
    module = layer().to(DTYPE).eval()
    if isinstance(module, OwnBias):
        reference = _as_linear(module.qkv.weight, torch.cat((module.q_bias, module.k_bias, module.v_bias)))
    else:
        reference = _as_linear(module.weight, module.bias)
    model, expected_model = nn.Sequential(module, nn.ReLU()), nn.Sequential(reference, nn.ReLU())
    x = torch.randn(5, 4, dtype=DTYPE)
    composite = composites.LayerMapComposite([(types.Linear, rules.ZPlus()), (nn.ReLU, rules.Pass())])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explained: no UncoveredModuleWarning
        ours = relevance(model, composite, x)
    torch.testing.assert_close(ours, relevance(expected_model, composite, x), rtol=1e-10, atol=1e-12)
    assert list(kinds(model, composite, x).values()) == [captured.Dense]


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D``: ``torch.addmm(bias, x, weight)`` with the weight stored transposed."""

    def __init__(self, features_in: int, features_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features_in, features_out) * 0.5)
        self.bias = nn.Parameter(torch.randn(features_out) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return flat.reshape(*x.shape[:-1], flat.shape[-1])


@pytest.mark.parametrize("rule", [rules.Epsilon, rules.ZPlus, lambda: rules.AlphaBeta(2, 1)], ids=["Epsilon", "ZPlus", "AlphaBeta"])
def test_addmm_is_a_dense_layer(rule: Callable[[], rules.Rule]) -> None:
    """GPT-2's ``Conv1D`` is explained as the ``nn.Linear`` holding the transposed weight (the dense rule, z+ and alpha-beta)."""
    torch.manual_seed(6)
    model = nn.Sequential(Conv1D(4, 6), nn.ReLU(), Conv1D(6, 3)).to(DTYPE).eval()
    reference = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(DTYPE).eval()
    with torch.no_grad():
        for conv1d, linear in ((model[0], reference[0]), (model[2], reference[2])):
            linear.weight.copy_(conv1d.weight.t())
            linear.bias.copy_(conv1d.bias)
    x = torch.randn(5, 4, dtype=DTYPE)
    composite = lambda: composites.LayerMapComposite([(types.Linear, rule()), (nn.ReLU, rules.Pass())])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explained: no UncoveredModuleWarning
        ours = relevance(model, composite(), x)
    torch.testing.assert_close(ours, relevance(reference, composite(), x), rtol=1e-10, atol=1e-12)
    assert set(kinds(model, composite(), x).values()) == {captured.Dense}


class ScaledAddMM(nn.Module):
    """``torch.addmm`` with ``beta`` or ``alpha`` not 1, or with its weight computed from the input: not a dense layer."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.weight, self.bias = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "alpha":
            return torch.addmm(self.bias, x, self.weight, alpha=0.5)
        return torch.addmm(self.bias, x, x.t() @ x @ self.weight)


@pytest.mark.parametrize("form", ["alpha", "input weight"])
def test_addmm_that_is_no_dense_layer_keeps_its_gradient(form: str) -> None:
    model = ScaledAddMM(form).to(DTYPE)
    with pytest.warns(composites.UncoveredModuleWarning, match=r"'' \(ScaledAddMM\)"):  # and it says so
        assert kinds(model, composites.EpsilonPlus(), torch.randn(4, 4, dtype=DTYPE)) == {"addmm": captured.Other}


class Experts(nn.Module):
    """A mixture of experts' layer: ``torch._grouped_mm`` over the rows routed to each expert (transformers' default).

    ``written_out``: the same layer as one ``F.linear`` per expert on its rows (the reference).
    ``stored``: ``"in_out"`` (``W[g]`` is ``in x out``) or ``"out_in"`` (``nn.Linear`` layout,
    passed transposed, as transformers does).
    """

    def __init__(self, stored: str, offsets: list[int], written_out: bool = False) -> None:
        super().__init__()
        shape = (len(offsets), 8, 4) if stored == "in_out" else (len(offsets), 4, 8)
        self.weight = nn.Parameter(torch.randn(*shape))
        self.stored, self.written_out = stored, written_out
        self.offsets = torch.tensor(offsets, dtype=torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.stored == "in_out" else self.weight.transpose(-2, -1)
        if not self.written_out:
            return torch._grouped_mm(x, weight, offs=self.offsets)
        start, rows = 0, []
        for expert, end in enumerate(self.offsets.tolist()):
            rows.append(F.linear(x[start:end], weight[expert].t()))
            start = end
        return torch.cat(rows)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch")
@pytest.mark.parametrize("stored", ["in_out", "out_in"])
@pytest.mark.parametrize(
    "rule",
    [rules.Epsilon, rules.ZPlus, lambda: rules.Gamma(0.25), lambda: rules.AlphaBeta(2, 1), rules.Flat, rules.WSquare],
    ids=["Epsilon", "ZPlus", "Gamma", "AlphaBeta", "Flat", "WSquare"],
)
def test_grouped_mm_is_a_dense_layer_per_expert(stored: str, rule: Callable[[], rules.Rule]) -> None:
    """Each expert's rows get the dense rule with that expert's weight, as written out with ``F.linear`` (float32:
    ``torch._grouped_mm`` has no float64 on the CPU). One expert gets no row."""
    torch.manual_seed(7)
    first = nn.Linear(5, 8)
    experts = Experts(stored, [3, 3, 7])
    written_out = Experts(stored, [3, 3, 7], written_out=True)
    written_out.load_state_dict(experts.state_dict())
    x = torch.rand(7, 5)
    composite = lambda: composites.LayerMapComposite([(types.Linear, rule()), (nn.ReLU, rules.Pass())])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explained: no UncoveredModuleWarning
        ours = relevance(nn.Sequential(first, nn.ReLU(), experts), composite(), x)
    reference = relevance(nn.Sequential(first, nn.ReLU(), written_out), composite(), x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert kinds(experts, composite(), torch.rand(7, 8)) == {"_grouped_mm": captured.Dense}
    gradient = Gradient(nn.Sequential(first, nn.ReLU(), experts))(x, target=0).relevance
    assert not torch.allclose(ours, gradient, rtol=1e-3, atol=1e-4)  # the rule, not the gradient


class BatchedExperts(nn.Module):
    """``torch._grouped_mm`` of a 3-D input (one batch per expert, no offsets): not a layer lrpkit explains."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x, self.weight)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch")
def test_grouped_mm_without_offsets_keeps_its_gradient() -> None:
    with pytest.warns(composites.UncoveredModuleWarning, match=r"'' \(BatchedExperts\)"):
        assert kinds(BatchedExperts(), composites.EpsilonPlus(), torch.rand(2, 4, 8)) == {"_grouped_mm": captured.Other}


class InputWeight(nn.Module):
    """``F.linear`` with a weight computed from the input: a product of activations, not a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.layer(x).t() @ x)


def kinds(model: nn.Module, composite: composites.Composite, x: torch.Tensor) -> dict[str, type]:
    """The kind of every captured ``F.linear``/``F.conv*`` call of ``model`` on ``x``."""
    (capture,) = [canonizer for canonizer in composite.canonizers if isinstance(canonizer, FunctionalCapture)]
    with composite.context(model):
        model(x.detach().requires_grad_(True))
        ops = capture.ops(model)
    return {name: type(op) for name, op in ops.items() if op.op in captured.LAYER_OPS}


def test_a_weight_computed_from_the_input_is_not_a_layer() -> None:
    model = InputWeight().to(DTYPE).eval()
    x = torch.randn(4, 4, dtype=DTYPE)
    assert kinds(model, composites.EpsilonPlus(), x) == {"linear": captured.Other}


@pytest.mark.filterwarnings("ignore::lrpkit.composites.UncoveredModuleWarning")
def test_a_layer_module_without_a_rule_keeps_its_gradient() -> None:
    """``nn.Linear.forward`` calls ``F.linear`` with its own weight: no rule for the module means the gradient."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).to(DTYPE).eval()
    x = torch.randn(3, 4, dtype=DTYPE)
    composite = composites.LayerMapComposite([(nn.ReLU, rules.Pass()), (nn.Linear, None)])
    assert kinds(model, composite, x) == {"0.linear": captured.Other, "2.linear": captured.Other}
    no_capture = composites.LayerMapComposite([(nn.ReLU, rules.Pass()), (nn.Linear, None)], canonizers=[])
    torch.testing.assert_close(relevance(model, composite, x), relevance(model, no_capture, x), rtol=1e-12, atol=1e-12)


def test_the_first_layer_rule_reaches_a_captured_call() -> None:
    """EpsilonPlusFlat's flat rule goes to whichever layer runs first, captured call or module."""
    layers, calls = build()
    x = inputs()
    flat_first = composites.EpsilonPlusFlat()
    plus = composites.EpsilonPlus()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        differs = relevance(calls, flat_first, x)
    assert not torch.allclose(differs, relevance(calls, plus, x), rtol=1e-6)
    assert kinds(calls, composites.EpsilonPlusFlat(), x) == {
        "conv2d": captured.Convolution,
        "conv2d_1": captured.Convolution,
        "conv_transpose2d": captured.ConvolutionTranspose,
        "linear": captured.Dense,
        "linear_1": captured.Dense,
    }


# -- layer modules whose class overrides forward: explained with the weight they really use --------


def standardized(weight: torch.Tensor) -> torch.Tensor:
    return (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / (weight.std(dim=(1, 2, 3), keepdim=True) + 1e-5)


class StdConv(nn.Conv2d):
    """A weight-standardised convolution (BiT, NFNets): ``forward`` passes a weight computed from ``self.weight``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, standardized(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConvInner(nn.Conv2d):
    """The same through ``_conv_forward``, which ``nn.Conv2d.forward`` calls."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return super()._conv_forward(x, standardized(weight), bias)


class HalfLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * 0.5, self.bias)


def layer_net(conv: type[nn.Conv2d], linear: type[nn.Linear]) -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(conv(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), linear(4 * 5 * 5, 3)).to(DTYPE).eval()


@pytest.mark.parametrize("conv", [StdConv, StdConvInner])
def test_a_layer_with_its_own_forward_is_explained_with_the_weight_it_uses(conv: type[nn.Conv2d]) -> None:
    custom = layer_net(conv, HalfLinear)
    plain = layer_net(nn.Conv2d, nn.Linear)
    with torch.no_grad():
        plain[0].weight.copy_(standardized(custom[0].weight))
        plain[0].bias.copy_(custom[0].bias)
        plain[3].weight.copy_(custom[3].weight * 0.5)
        plain[3].bias.copy_(custom[3].bias)
    x = torch.rand(2, 2, 5, 5, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    torch.testing.assert_close(custom(x), plain(x), rtol=1e-12, atol=1e-12)
    for preset in ("EpsilonGammaBox", "EpsilonAlpha2Beta1", "EpsilonPlus, zero bias"):
        expected = relevance(plain, PRESETS[preset](), x)
        torch.testing.assert_close(relevance(custom, PRESETS[preset](), x), expected, rtol=1e-10, atol=1e-12)


class PaddedConv(nn.Conv2d):
    """A ``forward`` that pads first: no layer call on the input itself, so the generic ops re-run it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


def test_a_layer_whose_forward_makes_no_call_on_its_input_is_re_run() -> None:
    custom = layer_net(PaddedConv, nn.Linear)
    plain = layer_net(nn.Conv2d, nn.Linear)
    plain.load_state_dict(custom.state_dict())
    x = torch.rand(2, 2, 5, 5, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    epsilon = composites.LayerMapComposite(composites.layer_map_base() + [(types.AnyLinear, rules.Epsilon())])
    torch.testing.assert_close(relevance(custom, epsilon, x), relevance(plain, epsilon, x), rtol=1e-10, atol=1e-12)


class Deformable(nn.Module):
    """conv -> relu -> deformable conv (offsets and a mask from the features) -> relu -> dense.

    ``offsets="zero"``: the offset and mask branches give zeros and ones (weights zero), so the
    deformable convolution is its plain convolution; ``layer="conv"`` puts that ``nn.Conv2d`` in
    its place, with the same weights.
    """

    def __init__(self, offsets: str = "learned", modulated: bool = True, layer: str = "deformable") -> None:
        from torchvision.ops import DeformConv2d

        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.offset = nn.Conv2d(4, 18, 3, padding=1)
        self.mask = nn.Conv2d(4, 9, 3, padding=1) if modulated else None
        self.deform = DeformConv2d(4, 5, 3, padding=1) if layer == "deformable" else nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Linear(5 * 6 * 6, 3)
        torch.manual_seed(4)
        with torch.no_grad():
            for module in (self.offset, self.mask):
                if module is not None and offsets == "zero":
                    module.weight.zero_()
                    module.bias.fill_(0.0 if module is self.offset else 20.0)  # sigmoid(20): a mask of 1 to 2e-9
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.stem(x))
        if isinstance(self.deform, nn.Conv2d):
            return self.head(torch.relu(self.deform(features)).flatten(1))
        offsets = self.offset(features) * 0.5
        mask = torch.sigmoid(self.mask(features)) if self.mask is not None else None
        return self.head(torch.relu(self.deform(features, offsets, mask)).flatten(1))


def deformable_inputs() -> torch.Tensor:
    return torch.rand(2, 2, 6, 6, generator=torch.Generator().manual_seed(5), dtype=DTYPE)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_a_deformable_convolution_with_zero_offsets_is_explained_as_its_convolution(preset: str) -> None:
    """``torchvision.ops.deform_conv2d`` is a convolution whose offsets and mask are held constant.

    Before, ``DeformConv2d`` had no rule in any preset (a warning, and its plain gradient, which
    also sent relevance into the offsets and the mask).
    """
    torch.manual_seed(0)
    deformable = Deformable(offsets="zero").eval()
    plain = Deformable(offsets="zero", layer="conv").eval()
    plain.load_state_dict({name: value for name, value in deformable.state_dict().items() if name in plain.state_dict()})
    x = deformable_inputs()
    with torch.no_grad():
        torch.testing.assert_close(deformable(x), plain(x), rtol=1e-7, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = relevance(deformable, PRESETS[preset](), x)
    torch.testing.assert_close(ours, relevance(plain, PRESETS[preset](), x), rtol=1e-6, atol=1e-9)
    assert hooks_left(deformable) == []


@pytest.mark.parametrize("modulated", [False, True], ids=["offsets", "offsets and mask"])
@pytest.mark.parametrize("mapped", [False, True], ids=["captured call", "rule on the module"])
def test_a_deformable_convolution_conserves_relevance(modulated: bool, mapped: bool) -> None:
    """Learned offsets (and mask): relevance reaches the input only, through the sampled positions.

    ``mapped``: the composite puts the rule on the ``DeformConv2d`` module itself, whose offset and
    mask arguments are held constant too.
    """
    from torchvision.ops import DeformConv2d

    torch.manual_seed(0)
    model = Deformable(modulated=modulated).eval()
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    epsilon = rules.Epsilon(epsilon=1e-14)
    layer_map = [(DeformConv2d, epsilon)] if mapped else []
    composite = composites.LayerMapComposite(
        layer_map + composites.layer_map_base(stabilizer=1e-14) + [(types.AnyLinear, epsilon)],
        canonizers=[FunctionalCapture(stabilizer=1e-14)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, ours = Gradient(model, composite)(deformable_inputs())
    logits = output.max(dim=1).values
    torch.testing.assert_close(ours.sum(dim=(1, 2, 3)), logits, rtol=1e-9, atol=0.0)
