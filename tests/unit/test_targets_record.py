"""Targets anywhere (``layer=``) and intermediate relevances (``record=``) of ``Gradient``.

Hand computations are in float64 on tiny networks; the conservation tests use bias-free layers
and an epsilon of ``1e-12``, so that relevance is conserved to rounding at every layer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from helpers import hooks_left
from lrpkit import composites, rules, types
from lrpkit.attribution import Gradient
from lrpkit.canonizers import FunctionalCapture

DTYPE = torch.float64
EPS = 1e-3  # large enough that the stabiliser visibly enters the hand computations


def mlp(bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5, bias=bias), nn.ReLU(), nn.Linear(5, 3, bias=bias)).to(DTYPE).eval()


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5, bias=False),
    ).to(DTYPE).eval()


def epsilon_composite(epsilon: float) -> composites.Composite:
    return composites.LayerMapComposite(
        [
            (types.Activation, rules.Pass()),
            (types.AvgPool, rules.Norm(stabilizer=1e-12)),
            (types.Sum, rules.Norm(stabilizer=1e-12)),
            (types.AnyLinear, rules.Epsilon(epsilon=epsilon)),
        ]
    )


def zplus_composite() -> composites.Composite:
    return composites.LayerMapComposite([(nn.ReLU, rules.Pass()), (nn.Linear, rules.ZPlus(stabilizer=EPS))])


def stab(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z)


def signed_input() -> torch.Tensor:
    return torch.tensor([[0.7, -1.2, 0.4, 2.0], [-0.3, 0.9, 1.5, -0.8]], dtype=DTYPE)


# ---------------------------------------------------------------------------------------------
# layer=: the backward starts at a layer's output
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channel", [0, 1, 3])
def test_channel_target_epsilon_by_hand(channel: int) -> None:
    model, x = mlp(), signed_input()
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    z = x @ weight.T + bias
    a = z.clamp(min=0)
    # ReLU passes its output relevance a_c; epsilon: R_i = x_i w_ci a_c / stab(z_c)
    expected = x * weight[channel] * (a[:, channel] / stab(z[:, channel], EPS))[:, None]
    result = Gradient(model, epsilon_composite(EPS))(x, target=channel, layer="1")
    torch.testing.assert_close(result.output, a, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.relevance, expected, rtol=1e-12, atol=1e-15)
    start = torch.zeros_like(a)
    start[:, channel] = a[:, channel]
    torch.testing.assert_close(result.start, start)
    assert expected.abs().sum() > 0


def test_channel_target_zplus_by_hand() -> None:
    model, x = mlp(), signed_input()
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    channel = 1
    z = x @ weight.T + bias  # the layer's real output: the start is one-hot times z
    w = weight[channel]
    positive = x.clamp(min=0) * w.clamp(min=0) + x.clamp(max=0) * w.clamp(max=0)
    z_plus = positive.sum(1) + bias[channel].clamp(min=0)
    expected = positive * (z[:, channel] / (z_plus + EPS))[:, None]
    result = Gradient(model, zplus_composite())(x, target=channel, layer="0")
    torch.testing.assert_close(result.output, z, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.relevance, expected, rtol=1e-12, atol=1e-15)


def test_channel_target_without_composite_is_the_scaled_gradient() -> None:
    model, x = mlp(), signed_input()
    weight, bias = model[0].weight.detach(), model[0].bias.detach()
    z = x @ weight.T + bias
    result = Gradient(model)(x, target=3, layer="1")
    expected = weight[3] * (z[:, 3].clamp(min=0) * (z[:, 3] > 0))[:, None]
    torch.testing.assert_close(result.relevance, expected, rtol=1e-12, atol=0)


def test_conv_channel_target_is_the_channel_map() -> None:
    model = cnn()
    x = torch.rand(2, 2, 6, 6, dtype=DTYPE)
    result = Gradient(model)(x, target=1, layer="2")
    inputs = x.clone().requires_grad_(True)
    head = model[:3](inputs)
    start = torch.zeros_like(head)
    start[:, 1] = head[:, 1].detach()
    (expected,) = torch.autograd.grad(head, inputs, start)
    torch.testing.assert_close(result.output, head.detach())
    torch.testing.assert_close(result.start, start)
    torch.testing.assert_close(result.relevance, expected)
    lrp = Gradient(model, epsilon_composite(1e-12))(x, target=1, layer="2")
    channel_total = head[:, 1].detach().flatten(1).sum(1)
    torch.testing.assert_close(lrp.relevance.flatten(1).sum(1), channel_total, rtol=1e-9, atol=1e-12)


def test_tensor_and_callable_targets_at_a_layer() -> None:
    model, x = mlp(), signed_input()
    weights = torch.rand(2, 5, dtype=DTYPE)
    by_tensor = Gradient(model)(x, target=weights, layer="0")
    by_callable = Gradient(model)(x, target=lambda out: weights * 1.0, layer="0")
    torch.testing.assert_close(by_tensor.relevance, weights @ model[0].weight.detach())
    torch.testing.assert_close(by_callable.relevance, by_tensor.relevance)
    with pytest.raises(ValueError, match=r"layer='0'.*shape \(2, 3\).*shape \(2, 5\)"):
        Gradient(model)(x, target=torch.rand(2, 3, dtype=DTYPE), layer="0")
    with pytest.raises(ValueError, match=r"layer='0'.*out of range"):
        Gradient(model)(x, target=7, layer="0")


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head_a = nn.Linear(6, 3)
        self.head_b = nn.Sequential(nn.ReLU(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.body(x)
        return {"a": self.head_a(hidden), "b": self.head_b(hidden)}


@pytest.mark.parametrize("make", [lambda: None, lambda: composites.EpsilonPlus()], ids=["plain", "epsilon_plus"])
def test_several_heads_with_output_selector_and_layer(make) -> None:
    torch.manual_seed(1)
    model = TwoHeads().to(DTYPE).eval()
    x = signed_input()
    attributor = Gradient(model, make(), output="b")
    whole = attributor(x, target=1, record=True)
    torch.testing.assert_close(whole.output, model(x)["b"].detach())
    assert list(whole.intermediate) == ["body", "head_b.0", "head_b.1"]
    at_layer = attributor(x, target=1, layer="head_b.0")
    torch.testing.assert_close(at_layer.output, model.body(x).clamp(min=0).detach())
    assert hooks_left(model) == []


def without_batchnorm_probe() -> composites.Composite:
    """EpsilonPlus without MergeBatchNorm, whose probe runs the whole model once per context."""
    return composites.EpsilonPlus(canonizers=[FunctionalCapture()])


def test_forward_stops_at_the_layer() -> None:
    class Explodes(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("the forward pass should have stopped before this module")

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), Explodes()).to(DTYPE)
    for composite in (None, without_batchnorm_probe()):
        result = Gradient(model, composite)(signed_input(), target=0, layer="1")
        assert result.output.shape == (2, 3)
        assert hooks_left(model) == []


def test_captured_call_as_layer() -> None:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x + self.linear(x))

    torch.manual_seed(0)
    model = Residual().to(DTYPE).eval()
    x = signed_input().abs()
    lrp = Gradient(model, epsilon_composite(1e-12))(x, target=2, layer="add")
    total = x + model.linear(x).detach()
    torch.testing.assert_close(lrp.output, total)
    torch.testing.assert_close(lrp.relevance.sum(1), total[:, 2], rtol=1e-9, atol=1e-12)
    plain = Gradient(model)(x, target=2, layer="add")  # no composite: a rule-free capture names the calls
    expected = total[:, 2:3] * (torch.eye(4, dtype=DTYPE)[2] + model.linear.weight.detach()[2])
    torch.testing.assert_close(plain.relevance, expected)
    assert hooks_left(model) == []


def test_layer_errors_name_the_layer_and_nearby_names() -> None:
    model = cnn()
    x = torch.rand(1, 2, 6, 6, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"layer='22'.*close names: '2'"):
        Gradient(model, composites.EpsilonPlus(canonizers=[]))(x, layer="22")
    with pytest.raises(ValueError, match=r"layer='relu_9' is neither a module.*close names"):
        Gradient(model, composites.EpsilonPlus())(x, layer="relu_9")
    with pytest.raises(TypeError, match="layer must be a module name"):
        Gradient(model)(x, layer=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layer='2'.*target=None \(argmax\) needs"):
        Gradient(model)(x, layer="2")
    unused = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    unused.forward = lambda x: unused[0](x)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"layer='1'.*was not called"):
        Gradient(unused)(signed_input().float(), layer="1", target=0)
    assert hooks_left(model) == [] and hooks_left(unused) == []


# ---------------------------------------------------------------------------------------------
# record=: relevance at the input of every module and captured call
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_recorded_relevance_is_conserved_at_every_layer(name: str) -> None:
    if name == "cnn":
        model, x = cnn(), torch.rand(3, 2, 6, 6, dtype=DTYPE)
        expected = ["0", "1", "2", "3", "4", "5", "6"]
    else:
        model, x = mlp(bias=False), torch.randn(3, 4, dtype=DTYPE)
        expected = ["0", "1", "2"]
    result = Gradient(model, epsilon_composite(1e-12))(x, record=True)
    assert list(result.intermediate) == expected
    total = result.start.flatten(1).sum(1)
    torch.testing.assert_close(total, result.output.max(1).values)
    layer_input = x
    for module_name, module in model.named_children():
        relevance = result.intermediate[module_name]
        assert relevance.shape == layer_input.shape, module_name
        torch.testing.assert_close(relevance.flatten(1).sum(1), total, rtol=1e-9, atol=1e-12, msg=module_name)
        layer_input = module(layer_input)
    torch.testing.assert_close(result.intermediate["0"], result.relevance)


def test_recorded_relevance_is_conserved_with_epsilon_plus_on_an_mlp() -> None:
    model, x = mlp(bias=False), torch.randn(3, 4, dtype=DTYPE)
    result = Gradient(model, composites.EpsilonPlus(epsilon=1e-12))(x, target=[0, 1, 2], record=True)
    for name, relevance in result.intermediate.items():
        torch.testing.assert_close(relevance.sum(1), result.start.sum(1), rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("make", [lambda: None, lambda: epsilon_composite(1e-12)], ids=["plain", "epsilon"])
def test_recording_changes_no_number(make) -> None:
    model, x = cnn(), torch.rand(2, 2, 6, 6, dtype=DTYPE)
    plain = Gradient(model, make())(x, target=[1, 3])
    recorded = Gradient(model, make())(x, target=[1, 3], record=True)
    assert torch.equal(plain.relevance, recorded.relevance)
    assert torch.equal(plain.output, recorded.output)
    assert plain.intermediate == {}


class Shared(nn.Module):
    """``x`` feeds two modules; ``twice`` is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(4, 3, bias=False)
        self.right = nn.Linear(4, 3, bias=False)
        self.twice = nn.Linear(3, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.twice(self.left(x)) + self.twice(self.right(x))


@pytest.mark.parametrize("make", [lambda: None, lambda: epsilon_composite(1e-12)], ids=["plain", "epsilon"])
def test_a_tensor_used_by_two_modules_is_recorded_per_module(make) -> None:
    torch.manual_seed(0)
    model = Shared().to(DTYPE).eval()
    x = torch.randn(2, 4, dtype=DTYPE)
    result = Gradient(model, make())(x, target=0, record=["left", "right", "twice"])
    assert list(result.intermediate) == ["left", "twice", "right", "twice#1"]
    left, right = result.intermediate["left"], result.intermediate["right"]
    torch.testing.assert_close(left + right, result.relevance)
    assert not torch.allclose(left, right)
    if make() is None:
        start = result.start[:, 0:1]
        weight_path = model.twice.weight.detach()[0]
        torch.testing.assert_close(left, start * (weight_path @ model.left.weight.detach()))
        torch.testing.assert_close(result.intermediate["twice#1"], start * weight_path.expand(2, 3))


def test_record_names_containers_and_captured_calls() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.flatten(x + self.conv(torch.relu(x)), 1)

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(2 * 4 * 4, 3, bias=False)).to(DTYPE).eval()
    x = torch.rand(2, 2, 4, 4, dtype=DTYPE)
    for composite in (None, composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12)):
        result = Gradient(model, composite)(x, target=1, record=True)
        assert list(result.intermediate) == ["0.relu", "0.conv", "0.add[0]", "0.add[1]", "0.flatten", "1"]
        add = [result.intermediate["0.add[0]"], result.intermediate["0.add[1]"]]
        if composite is None:  # the gradient of a sum: both inputs get all of it
            torch.testing.assert_close(add[0], add[1])
            torch.testing.assert_close(add[0], result.intermediate["0.flatten"])
        else:  # Norm: a proportional split
            torch.testing.assert_close((add[0] + add[1]).flatten(1).sum(1), result.intermediate["1"].sum(1))
        chosen = Gradient(model, composite)(x, target=1, record=["0.add", "0", "0.flatten"])
        assert list(chosen.intermediate) == ["0", "0.add[0]", "0.add[1]", "0.flatten"]
        torch.testing.assert_close(chosen.intermediate["0"], chosen.relevance)
        assert hooks_left(model) == []
    with pytest.raises(ValueError, match=r"record: '0.ad' is neither.*close names: '0.add'"):
        Gradient(model)(x, record=["0.ad"])
    with pytest.raises(ValueError, match=r"record: '0.ad' is not a module.*FunctionalCapture"):
        Gradient(model, composites.EpsilonPlus(canonizers=[]))(x, record=["0.ad"])
    with pytest.raises(TypeError, match="record must be True"):
        Gradient(model)(x, record=[0])  # type: ignore[list-item]


def test_calls_that_hand_on_their_input_get_no_entry() -> None:
    class Passing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = torch.flatten(self.fc1(x), 1)  # 2-D already: flatten returns its input
            return self.fc2((hidden * 2).contiguous())  # contiguous already: returns its input

    torch.manual_seed(0)
    model = Passing().to(DTYPE).eval()
    for composite in (None, composites.EpsilonPlus()):
        result = Gradient(model, composite)(signed_input(), target=1, record=True)
        assert list(result.intermediate) == ["fc1", "mul", "fc2"]
        assert result.intermediate["mul"].shape == (2, 4)


def test_merged_batchnorm_is_a_layer_and_is_recorded() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model = model.to(DTYPE).eval()
    x = torch.rand(2, 2, 4, 4, dtype=DTYPE)
    for _ in range(2):  # the first context finds the pairs in a probe pass, the second reuses them
        at_norm = Gradient(model, composites.EpsilonPlus())(x, target=1, layer="1")
        torch.testing.assert_close(at_norm.output, model[:2](x).detach())
        recorded = Gradient(model, composites.EpsilonPlus())(x, record=True)
        assert list(recorded.intermediate) == ["0", "1", "2", "3", "4"]
        assert hooks_left(model) == []


def test_recording_an_identity_before_an_augmented_assignment_changes_nothing() -> None:
    # what a ResNet block does once MergeBatchNorm has turned its BatchNorm into an identity
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4, bias=False)
            self.norm = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.norm(self.linear(x))
            out += x
            return out

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.Linear(4, 2, bias=False)).to(DTYPE).eval()
    x = signed_input()
    plain = Gradient(model, composites.EpsilonPlus())(x, target=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no InPlaceWarning: the add is captured as usual
        recorded = Gradient(model, composites.EpsilonPlus())(x, target=0, record=True)
    assert torch.equal(recorded.relevance, plain.relevance)
    assert list(recorded.intermediate) == ["0.linear", "0.norm", "0.add[0]", "0.add[1]", "1"]


def test_record_and_layer_together() -> None:
    model, x = cnn(), torch.rand(2, 2, 6, 6, dtype=DTYPE)
    result = Gradient(model, epsilon_composite(1e-12))(x, target=2, layer="3", record=True)
    assert list(result.intermediate) == ["0", "1", "2", "3"]
    for relevance in result.intermediate.values():
        torch.testing.assert_close(relevance.flatten(1).sum(1), result.start.flatten(1).sum(1), rtol=1e-9, atol=1e-12)


def test_input_modified_in_place_is_reported_not_recorded() -> None:
    class InPlace(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2.0)
            return x

    model = nn.Sequential(nn.Linear(4, 4), InPlace(), nn.Linear(4, 2)).to(DTYPE)
    plain = Gradient(model)(signed_input(), target=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Gradient(model)(signed_input(), target=0, record=True)
    assert "1" not in result.intermediate and "0" in result.intermediate
    assert any("modified in place" in str(warning.message) for warning in caught)
    torch.testing.assert_close(result.relevance, plain.relevance)


@pytest.mark.parametrize("make", [lambda: None, without_batchnorm_probe], ids=["plain", "epsilon_plus"])
def test_no_hooks_left_after_an_exception_in_the_model(make) -> None:
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), Fails()).to(DTYPE)
    for kwargs in ({"record": True}, {"layer": "3"}, {"layer": "3", "record": ["0", "2"]}):
        with pytest.raises(RuntimeError, match="boom"):
            Gradient(model, make())(signed_input(), target=0, **kwargs)
        assert hooks_left(model) == []
    result = Gradient(model, make())(signed_input(), target=0, layer="2", record=True)
    assert list(result.intermediate) == ["0", "1", "2"]
    assert hooks_left(model) == []
