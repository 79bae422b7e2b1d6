"""A ReLU lends its output to the rule before it (lrpkit.rectified): same numbers, less memory.

Each test compares a model with ``nn.ReLU`` (which lends) against the same model with a ReLU
subclass (which does not), so the only difference is the lending.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import graph_nodes
import lrpkit
from lrpkit import composites, core, rectified, rules
from lrpkit.attribution import Gradient


class NoLendReLU(nn.ReLU):
    """A ReLU subclass: it never lends its output (only plain ``nn.ReLU`` does)."""


class Block(nn.Module):
    """A residual block: ``relu(conv(relu(conv(x))) + x)`` with a functional ReLU at the end."""

    def __init__(self, relu: type[nn.Module]) -> None:
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), relu(), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(self.relu(self.conv1(x))) + x)


def network(relu: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), relu(), Block(relu), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), relu(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 6), relu(), nn.Linear(6, 3),
    ).double().eval()


def epsilon_only() -> composites.Composite:
    return composites.LayerMapComposite(composites.layer_map_base() + [((nn.Conv2d, nn.Linear), rules.Epsilon())])


COMPOSITES = {
    "epsilon": epsilon_only,
    "epsilon_plus_flat": composites.EpsilonPlusFlat,
    "gamma_box": lambda: composites.EpsilonGammaBox(low=0.0, high=1.0),
    "alpha2beta1": composites.EpsilonAlpha2Beta1,
}


def relevance(model: nn.Module, composite: composites.Composite, x: torch.Tensor) -> torch.Tensor:
    return Gradient(model, composite)(x).relevance


def kept_outputs(model: nn.Module, composite: composites.Composite, x: torch.Tensor) -> dict[str, bool]:
    """``{module name: whether it keeps a lent ReLU output}`` for every rule node that keeps one."""
    with composite.context(model):
        output = model(x.clone().requires_grad_(True))
        return {node.pending.name: node.kept_output.rectified for node in graph_nodes(output) if _keeps(node)}


def _keeps(node: object) -> bool:
    return getattr(node, "kept_output", None) is not None


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_lending_gives_the_same_relevance(name):
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    lent = relevance(network(nn.ReLU), COMPOSITES[name](), x)
    kept = relevance(network(NoLendReLU), COMPOSITES[name](), x)
    torch.testing.assert_close(lent, kept, rtol=1e-12, atol=1e-15)


def test_layers_before_a_plain_relu_keep_its_output_and_the_others_their_own():
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    found = kept_outputs(network(nn.ReLU), epsilon_only(), x)
    assert found["0"] and found["4"] and found["7"] and found["2.conv1"]  # before nn.ReLU modules
    assert found["2.add"]  # the residual sum, before the captured torch.relu
    assert not found["2.conv2"] and not found["9"]  # before the sum, and the last layer
    assert not any(kept_outputs(network(NoLendReLU), epsilon_only(), x)[name] for name in ("0", "4", "7"))


class PreActivationReused(nn.Module):
    """``lin2(relu(z)) + lin3(z)``: ``z`` has a second consumer that sends it relevance where ``z < 0``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin1, self.relu, self.lin2, self.lin3 = nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.lin1(x)
        return self.lin2(self.relu(z)) + self.lin3(z)


def test_relevance_where_the_relu_output_is_zero_falls_back_to_the_real_output():
    x = torch.randn(4, 5, dtype=torch.float64)
    model = PreActivationReused().double().eval()
    lent = relevance(model, epsilon_only(), x)
    model.relu = NoLendReLU()
    kept = relevance(model, epsilon_only(), x)
    torch.testing.assert_close(lent, kept, rtol=1e-12, atol=1e-15)


def test_flat_above_a_relu_falls_back_to_the_real_output():
    """Flat sends relevance to neurons whose ReLU output is zero: the check must catch it."""
    torch.manual_seed(2)
    x = torch.randn(4, 5, dtype=torch.float64)

    def model(relu: type[nn.Module]) -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(5, 6), relu(), nn.Linear(6, 3)).double().eval()

    def composite() -> composites.Composite:
        return composites.NameMapComposite([(["0"], rules.Epsilon()), (["2"], rules.Flat()), (["1"], rules.Pass())])

    torch.testing.assert_close(relevance(model(nn.ReLU), composite(), x), relevance(model(NoLendReLU), composite(), x))


def test_certified_relevance_skips_the_value_check(monkeypatch):
    calls = []
    check = rectified.zero_where_zero

    def counted(relevance: torch.Tensor, output: torch.Tensor) -> bool:
        calls.append(tuple(output.shape))
        return check(relevance, output)

    monkeypatch.setattr(rectified, "zero_where_zero", counted)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    relevance(network(nn.ReLU), epsilon_only(), x)
    # checked: the first ReLU (its output feeds a conv and the residual sum) and the ReLU before
    # flatten; certified: the ReLUs whose output goes straight into one epsilon layer, and the
    # sum's ReLU, whose certificate max pooling carries back
    assert (1, 4, 8, 8) in calls and (1, 4, 2, 2) in calls
    assert len(calls) == 2


def test_zero_where_zero_is_exact():
    output = torch.tensor([0.0, 1.0, 0.0, 2.0])
    assert rectified.zero_where_zero(torch.tensor([0.0, 3.0, -0.0, -1.0]), output)
    assert not rectified.zero_where_zero(torch.tensor([0.0, 3.0, 1e-30, -1.0]), output)
    assert not rectified.zero_where_zero(torch.tensor([float("nan"), 3.0, 0.0, -1.0]), output)
    assert not rectified.zero_where_zero(torch.tensor([0.0, float("inf"), 0.0, 1.0]), output)


class ScalesInPlace(nn.Module):
    def __init__(self, in_place: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        if self.in_place:
            out.mul_(2.0)
        else:
            out = out * 2.0
        return out


def _same_weights(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make().double()


def test_an_output_changed_in_place_after_the_forward_is_computed_again():
    """The rule of ``lin`` needs ``W x + b``; the model doubled that tensor in place, so the rule recomputes it."""
    composite = composites.LayerMapComposite([(nn.Linear, rules.Epsilon())], canonizers=[])
    x = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    in_place = Gradient(_same_weights(lambda: ScalesInPlace()), composite)(x)
    out_of_place = Gradient(_same_weights(lambda: ScalesInPlace(in_place=False)), composite)(x)
    assert torch.equal(in_place.output, out_of_place.output)
    torch.testing.assert_close(in_place.relevance, out_of_place.relevance, rtol=1e-12, atol=0)


class _ReadsOutputOnly(rules.Pass):
    """A rule that reads its module's output but keeps none of its inputs."""

    needs_output = True

    def relevance(self, call: Any, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
        assert call.output is not None
        return (relevance * 0.5,)


def test_an_output_changed_in_place_is_refused_when_the_rule_keeps_no_inputs():
    composite = composites.LayerMapComposite([(nn.Linear, _ReadsOutputOnly())], canonizers=[])
    with pytest.raises(RuntimeError, match=r"'lin' \(Linear\) was modified by an in-place operation.*keeps no inputs"):
        Gradient(ScalesInPlace(), composite)(torch.rand(1, 3))


def _kept_bytes(output: torch.Tensor, parameters: set[int]) -> int:
    """Bytes of the distinct storages the autograd graph of ``output`` keeps (parameters excluded)."""
    storages: dict[int, int] = {}
    for node in graph_nodes(output):
        tensors = [getattr(node, name) for name in dir(node) if name.startswith("_saved_") and name != "_saved_tensors"]
        tensors += list(getattr(node, "saved_tensors", ()))
        kept = getattr(node, "kept_output", None)
        tensors += [kept.tensor] if kept is not None else []
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


def test_epsilon_keeps_no_more_activations_than_the_plain_gradient():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(8 * 8 * 8, 4),
    ).eval().requires_grad_(False)
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    x = torch.rand(2, 3, 16, 16)
    output = model(x.clone().requires_grad_(True))
    gradient = _kept_bytes(output, parameters)
    with epsilon_only().context(model):
        lrp = _kept_bytes(model(x.clone().requires_grad_(True)), parameters)
    assert lrp <= gradient + output.nbytes  # the last layer keeps its output: no ReLU follows it


class ScalesBeforeTheReLU(nn.Module):
    def __init__(self, in_place: bool = True) -> None:
        super().__init__()
        self.lin, self.relu = nn.Linear(3, 2), nn.ReLU()
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        if self.in_place:
            out.mul_(2.0)
        else:
            out = out * 2.0
        return self.relu(out)


def test_an_output_changed_in_place_is_not_lent_away():
    """The ReLU's output is ``relu(2 z)``: lent to ``lin``, the rule would divide by twice its output."""
    composite = composites.LayerMapComposite([(nn.Linear, rules.Epsilon()), (nn.ReLU, rules.Pass())], canonizers=[])
    x = torch.rand(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    in_place = Gradient(_same_weights(lambda: ScalesBeforeTheReLU()), composite)(x)
    out_of_place = Gradient(_same_weights(lambda: ScalesBeforeTheReLU(in_place=False)), composite)(x)
    assert in_place.relevance.abs().sum() > 0
    torch.testing.assert_close(in_place.relevance, out_of_place.relevance, rtol=1e-12, atol=0)


def _kept(output: torch.Tensor) -> list[rectified.KeptOutput]:
    """Every kept output in the autograd graph of ``output``."""
    return [node.kept_output for node in graph_nodes(output) if _keeps(node)]


def test_kept_outputs_are_let_go_by_the_backward_while_the_graph_lives_on():
    """A tensor set on an autograd ctx lives as long as the graph: the backward must drop it."""
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    model = network(nn.ReLU)
    with composites.EpsilonAlpha2Beta1().context(model):
        output = model(x)
        kept = _kept(output)
        assert len(kept) >= 5 and all(entry.tensor is not None for entry in kept)
        torch.autograd.grad(output, x, output.detach())
        assert all(entry.tensor is None for entry in kept)


@pytest.mark.parametrize("relu", [nn.ReLU, lambda: nn.ReLU(inplace=True)], ids=["relu", "inplace_relu"])
@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_a_second_backward_through_a_retained_graph_recomputes_what_the_first_let_go(name, relu):
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    model = network(relu)
    with COMPOSITES[name]().context(model):
        output = model(x)
        start = torch.zeros_like(output)
        start[:, 1] = output[:, 1].detach()
        (first,) = torch.autograd.grad(output, x, start, retain_graph=True)
        (second,) = torch.autograd.grad(output, x, start)
    torch.testing.assert_close(second, first, rtol=1e-12, atol=1e-15)


class OutputOnly(rules.Rule):
    """A custom rule that reads the output and not the inputs: nothing to recompute it from."""

    needs_output = True
    needs_inputs = False

    def relevance(self, call, relevance):  # type: ignore[no-untyped-def]
        return (relevance * (call.output > 0),)


def test_a_second_backward_without_inputs_to_recompute_the_output_says_so():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    composite = composites.LayerMapComposite([(nn.Linear, rules.Epsilon()), (nn.Tanh, OutputOnly())], canonizers=[])
    x = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    with composite.context(model):
        output = model(x)
        torch.autograd.grad(output, x, output.detach(), retain_graph=True)
        with pytest.raises(RuntimeError, match=r"module '1' \(Tanh\) needs the layer's output but not its inputs"):
            torch.autograd.grad(output, x, output.detach())


# -- a smooth activation is computed again from its input, which the layer before it keeps ----------


class SmoothMLP(nn.Module):
    """``fc2(dropout(activation(fc1(x))))``: the MLP of a transformer block."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fc1, self.activation, self.dropout, self.fc2 = nn.Linear(5, 16), activation, nn.Dropout(0.1), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


class FunctionalMLP(SmoothMLP):
    """The same with a functional activation called in ``forward`` (seen through FunctionalCapture)."""

    def __init__(self, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(nn.Identity())
        self.function = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.function(self.fc1(x)))


ACTIVATIONS = {
    "gelu": lambda: SmoothMLP(nn.GELU()),
    "gelu_tanh": lambda: SmoothMLP(nn.GELU(approximate="tanh")),
    "silu": lambda: SmoothMLP(nn.SiLU()),
    "tanh": lambda: SmoothMLP(nn.Tanh()),
    "softplus": lambda: SmoothMLP(nn.Softplus(beta=2.0)),
    "elu_inplace": lambda: SmoothMLP(nn.ELU(inplace=True)),  # run out of place inside the context
    "functional_gelu": lambda: FunctionalMLP(nn.functional.gelu),
    "functional_gelu_tanh": lambda: FunctionalMLP(lambda x: nn.functional.gelu(x, approximate="tanh")),
    "functional_softplus": lambda: FunctionalMLP(lambda x: nn.functional.softplus(x, beta=2.0)),
    "method_tanh": lambda: FunctionalMLP(torch.Tensor.tanh),
}


def epsilon_with_capture() -> composites.Composite:
    return composites.LayerMapComposite(composites.layer_map_base() + [(nn.Linear, rules.Epsilon())])


def _fc2_saves_fc1_output(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether fc2's rule node saved fc1's kept output in place of the activation's output."""
    with epsilon_with_capture().context(model):
        output = model(x.clone().requires_grad_(True))
        nodes = {node.pending.name: node for node in graph_nodes(output) if hasattr(node, "pending")}
        (saved,) = nodes["fc2"].saved_tensors
        recomputed = nodes["fc2"].recomputed is not None
        assert not recomputed or saved.data_ptr() == nodes["fc1"].kept_output.tensor.data_ptr()
        return recomputed


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_an_activation_output_is_computed_again_not_kept(name, monkeypatch):
    model = ACTIVATIONS[name]().double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    assert _fc2_saves_fc1_output(model, x)
    recomputed = relevance(model, epsilon_with_capture(), x)
    monkeypatch.setattr(core, "offer_recompute", lambda *args: None)
    assert not _fc2_saves_fc1_output(model, x)
    assert torch.equal(recomputed, relevance(model, epsilon_with_capture(), x))


@pytest.mark.parametrize("activation", [nn.PReLU, nn.RReLU])
def test_activations_with_parameters_or_randomness_are_kept(activation):
    model = SmoothMLP(activation()).double().eval()
    assert not _fc2_saves_fc1_output(model, torch.randn(4, 5, dtype=torch.float64))


def test_with_an_activation_computed_again_lrp_keeps_no_more_than_the_gradient():
    model = SmoothMLP(nn.GELU()).eval().requires_grad_(False)
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    x = torch.rand(4, 5)
    gradient = _kept_bytes(model(x.clone().requires_grad_(True)), parameters)  # GELU's input
    with epsilon_only().context(model):
        output = model(x.clone().requires_grad_(True))
        lrp = _kept_bytes(output, parameters)
    # and the rules keep what the gradient does not: fc1's input, fc2's output
    assert lrp <= gradient + x.nbytes + output.nbytes


def test_a_second_backward_through_a_retained_graph_computes_the_activation_again():
    model = SmoothMLP(nn.GELU()).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    with epsilon_with_capture().context(model):
        output = model(x)
        (first,) = torch.autograd.grad(output, x, output.detach(), retain_graph=True)
        (second,) = torch.autograd.grad(output, x, output.detach())
    assert torch.equal(first, second)


# -- an nn.ReLU(inplace=True) rectifies its input in place, unrecorded --------------------------


def inplace_relu() -> nn.Module:
    return nn.ReLU(inplace=True)


def relu_nodes(output: torch.Tensor) -> list[object]:
    """The autograd nodes of ReLUs behind ``output``: lrpkit rule nodes of ReLU modules and native ones."""
    return [
        node
        for node in graph_nodes(output)
        if isinstance(getattr(getattr(node, "pending", None), "module", None), nn.ReLU)
        or type(node).__name__.startswith(("ReluBackward", "ThresholdBackward"))
    ]


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_an_inplace_relu_gives_the_same_relevance(name):
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    in_place = relevance(network(inplace_relu), COMPOSITES[name](), x)
    kept = relevance(network(NoLendReLU), COMPOSITES[name](), x)
    torch.testing.assert_close(in_place, kept, rtol=1e-12, atol=1e-15)


def test_an_inplace_relu_makes_no_node_and_no_tensor_and_the_layer_keeps_its_output():
    model = network(inplace_relu)
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    produced = {}
    model[1].register_forward_pre_hook(lambda module, args: produced.update(conv=args[0]))
    model[1].register_forward_hook(lambda module, args, output: produced.update(relu=output))
    with epsilon_only().context(model):
        output = model(x.clone().requires_grad_(True))
        assert produced["relu"] is produced["conv"]  # the same tensor, rectified
        assert bool((produced["relu"] >= 0).all())
        assert core.produced_nonnegative(produced["relu"])
        assert not relu_nodes(output)
        found = {node.pending.name: node.kept_output.rectified for node in graph_nodes(output) if _keeps(node)}
    assert found["0"] and found["4"] and found["7"] and found["2.conv1"]
    assert model[1].inplace is True and "forward" not in vars(model[1])  # the module is as it was


class UsedBeforeTheReLU(nn.Module):
    """``signed(flatten(f(z))) + rectified(flatten(relu(z)))``, ``f(z)`` computed before the ReLU."""

    def __init__(self, relu: Callable[[], nn.Module], before: str) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv, self.relu, self.pool = nn.Conv2d(3, 4, 3, padding=1), relu(), nn.AvgPool2d(1)
        self.signed, self.rectified = nn.Linear(4 * 8 * 8, 3), nn.Linear(4 * 8 * 8, 3)
        self.before = before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        signed = z.clone() if self.before == "clone" else self.pool(z)  # before the ReLU overwrites z
        rectified = self.rectified(torch.flatten(self.relu(z), 1))
        return self.signed(torch.flatten(signed, 1)) + rectified  # the signed layer runs after the ReLU


@pytest.mark.parametrize("before", ["clone", "pool"])
def test_what_was_computed_from_the_output_before_an_inplace_relu_stays_signed(before):
    """A copy of ``z`` is not taken for non-negative (z+ must take both signs); a pool saved ``z``."""
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    composite = lambda: composites.LayerMapComposite(  # noqa: E731
        composites.layer_map_base() + [((nn.Conv2d, nn.Linear), rules.ZPlus())]
    )
    model = UsedBeforeTheReLU(inplace_relu, before).double().eval()
    with composite().context(model):
        output = model(x.clone().requires_grad_(True))
        assert len(relu_nodes(output)) == (0 if before == "clone" else 1)  # the pool keeps z: out of place
    in_place = relevance(model, composite(), x)
    kept = relevance(UsedBeforeTheReLU(NoLendReLU, before).double().eval(), composite(), x)
    torch.testing.assert_close(in_place, kept, rtol=1e-12, atol=1e-15)


def test_an_inplace_relu_on_the_model_input_leaves_the_input_alone():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 2)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    original = x.clone()
    relevance(model, epsilon_only(), x)
    torch.testing.assert_close(x, original, rtol=0, atol=0)


def test_an_inplace_relu_after_a_rule_that_reads_its_whole_output_runs_out_of_place():
    """OutputOnly reads the output everywhere: it keeps it, and the ReLU may not overwrite it."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.ReLU(inplace=True), nn.Linear(4, 2)).double().eval()
    composite = composites.LayerMapComposite(
        [(nn.Linear, rules.Epsilon()), (nn.Tanh, OutputOnly()), (nn.ReLU, rules.Pass())], canonizers=[]
    )
    x = torch.randn(5, 3, dtype=torch.float64)
    expected_model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), NoLendReLU(), nn.Linear(4, 2)).double().eval()
    expected_model.load_state_dict(model.state_dict())
    with composite.context(model):
        output = model(x.clone().requires_grad_(True))
        assert len(relu_nodes(output)) == 1  # the ReLU's own node: out of place
    torch.testing.assert_close(relevance(model, composite, x), relevance(expected_model, composite, x))


def test_flat_above_an_inplace_relu_recomputes_the_overwritten_output():
    torch.manual_seed(2)
    x = torch.randn(4, 5, dtype=torch.float64)

    def model(relu: Callable[[], nn.Module]) -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(5, 6), relu(), nn.Linear(6, 3)).double().eval()

    def composite() -> composites.Composite:
        return composites.NameMapComposite([(["0"], rules.Epsilon()), (["2"], rules.Flat()), (["1"], rules.Pass())])

    torch.testing.assert_close(relevance(model(inplace_relu), composite(), x), relevance(model(NoLendReLU), composite(), x))


def test_an_inplace_relu_whose_rule_does_not_pass_relevance_runs_out_of_place():
    model = network(inplace_relu)
    composite = composites.LayerMapComposite([(nn.ReLU, rules.Epsilon()), ((nn.Conv2d, nn.Linear), rules.Epsilon())])
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with composite.context(model):
        output = model(x.clone().requires_grad_(True))
        assert len(relu_nodes(output)) == 4  # every nn.ReLU call has its own rule node
    torch.testing.assert_close(relevance(model, composite, x), relevance(network(NoLendReLU), composite, x))


class FunctionalReLUs(nn.Module):
    """``fc(flatten(F.relu(conv2(F.relu(conv1(x))))))`` with ``inplace`` as given."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc, self.in_place = nn.Linear(4 * 8 * 8, 3), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x), inplace=self.in_place)
        h = F.relu(self.conv2(h), inplace=self.in_place)
        return self.fc(torch.flatten(h, 1))


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_a_functional_inplace_relu_is_rectified_in_place_with_the_same_relevance(name):
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    model = FunctionalReLUs(inplace=True).double().eval()
    with COMPOSITES[name]().context(model):
        output = model(x.clone().requires_grad_(True))
        assert not [node for node in graph_nodes(output) if rectified.is_plain_relu(getattr(getattr(node, "pending", None), "module", None))]
    in_place = relevance(model, COMPOSITES[name](), x)
    out_of_place = relevance(FunctionalReLUs(inplace=False).double().eval(), COMPOSITES[name](), x)
    torch.testing.assert_close(in_place, out_of_place, rtol=1e-12, atol=1e-15)
    names = [row.name for row in lrpkit.describe(model, x, composite=COMPOSITES[name]()).rows]
    assert "relu" in names and "relu_1" in names  # still captured and named


# -- certified relevances added up by autograd stay certified ---------------------------------


class TwoConsumers(nn.Module):
    """``top(relu(lin(x))) + side(relu(lin(x)))``: the ReLU's output feeds two layers."""

    def __init__(self, relu: Callable[[], nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.lin, self.relu, self.top, self.side = nn.Linear(5, 8), relu(), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.lin(x))
        side = self.side(a)  # made first, so its node runs last: its relevance is added to top's
        return self.top(a) + side


def counted_checks(monkeypatch) -> list[tuple[int, ...]]:  # type: ignore[no-untyped-def]
    calls: list[tuple[int, ...]] = []
    check = rectified.zero_where_zero

    def counted(relevance: torch.Tensor, output: torch.Tensor) -> bool:
        calls.append(tuple(output.shape))
        return check(relevance, output)

    monkeypatch.setattr(rectified, "zero_where_zero", counted)
    return calls


@pytest.mark.parametrize("side", ["epsilon", "flat"])
def test_certified_relevances_added_by_autograd_skip_the_check_and_others_do_not(side, monkeypatch):
    """Two epsilon consumers: their sum is certified. A flat one sends relevance where ``a == 0``."""
    x = torch.randn(6, 5, dtype=torch.float64)

    def composite() -> composites.Composite:
        side_rule = rules.Epsilon() if side == "epsilon" else rules.Flat()
        return composites.NameMapComposite(
            [(["lin", "top"], rules.Epsilon()), (["side"], side_rule), (["relu"], rules.Pass())], canonizers=[]
        )

    reference = relevance(TwoConsumers(NoLendReLU).double().eval(), composite(), x)
    calls = counted_checks(monkeypatch)
    in_place = relevance(TwoConsumers(inplace_relu).double().eval(), composite(), x)
    assert len(calls) == (0 if side == "epsilon" else 1)
    torch.testing.assert_close(in_place, reference, rtol=1e-12, atol=1e-15)


def test_a_backward_that_stops_above_a_node_leaves_no_count_for_the_next():
    """Relevance sent to a node by a backward that ends above it does not count in a later one."""
    x = torch.randn(6, 5, dtype=torch.float64)
    composite = composites.NameMapComposite(
        [(["lin", "top"], rules.Epsilon()), (["side"], rules.Flat()), (["relu"], rules.Pass())], canonizers=[]
    )

    def explain(relu: Callable[[], nn.Module], stop_above_first: bool) -> torch.Tensor:
        model = TwoConsumers(relu).double().eval()
        seen: dict[str, torch.Tensor] = {}
        model.relu.register_forward_hook(lambda module, args, output: seen.update(a=output))
        inputs = x.clone().requires_grad_(True)
        with composite.context(model):
            output = model(inputs)
            start = output.detach()
            if stop_above_first:  # the top layer sends its certified relevance; the ReLU's node does not run
                torch.autograd.grad(output, seen["a"], start, retain_graph=True)
            (gradient,) = torch.autograd.grad(output, inputs, start)
        return gradient

    torch.testing.assert_close(explain(inplace_relu, True), explain(NoLendReLU, False), rtol=1e-12, atol=1e-15)


# -- max pooling carries certificates back -----------------------------------------------------


class PooledConsumers(nn.Module):
    """``top(pool(relu(conv(x)))) + side(pool(relu(conv(x))))``: one max pooling, two consumers."""

    def __init__(self, relu: Callable[[], nn.Module], pool: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv, self.relu, self.pool = nn.Conv2d(2, 4, 3, padding=1), relu(), pool
        self.top, self.side = nn.Conv2d(4, 3, 2), nn.Conv2d(4, 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.relu(self.conv(x)))
        return self.top(pooled).flatten(1) + self.side(pooled).flatten(1)


POOLS = {
    "2x2": lambda: nn.MaxPool2d(2),
    "overlapping, padded": lambda: nn.MaxPool2d(3, stride=2, padding=1),
    "adaptive": lambda: nn.AdaptiveMaxPool2d(3),
}


@pytest.mark.parametrize("side", ["epsilon", "flat"])
@pytest.mark.parametrize("pool", POOLS.values(), ids=POOLS.keys())
def test_max_pooling_carries_the_certificates_of_its_consumers_back(pool, side, monkeypatch):
    """Both consumers certify: no value check before the pooling. A flat one does not: checked."""
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def composite() -> composites.Composite:
        side_rule = rules.Epsilon() if side == "epsilon" else rules.Flat()
        return composites.NameMapComposite(
            [(["conv", "top"], rules.Epsilon()), (["side"], side_rule), (["relu"], rules.Pass())], canonizers=[]
        )

    reference = relevance(PooledConsumers(NoLendReLU, pool()).double().eval(), composite(), x)
    calls = counted_checks(monkeypatch)
    lent = relevance(PooledConsumers(nn.ReLU, pool()).double().eval(), composite(), x)
    assert len(calls) == (0 if side == "epsilon" else 1)
    torch.testing.assert_close(lent, reference, rtol=1e-12, atol=1e-15)


def test_a_certificate_carried_through_max_pooling_is_needed(monkeypatch):
    """Without the carried certificate the layer before the pooling checks the values."""
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    composite = composites.NameMapComposite([(["conv", "top", "side"], rules.Epsilon()), (["relu"], rules.Pass())], canonizers=[])
    monkeypatch.setattr(core, "certify_through_max_pool", lambda pooled: None)
    calls = counted_checks(monkeypatch)
    relevance(PooledConsumers(nn.ReLU, nn.MaxPool2d(2)).double().eval(), composite, x)
    assert calls == [(2, 4, 6, 6)]
