"""The shortcuts taken for speed give the same numbers as the plain definitions.

Each test here pins one fast path of issue 4: the mask-free stabiliser, the graph-based
non-negativity flags, alpha-beta's ``z- = z - z+`` with its cancellation guard, the
closed-form transpose of captured additions and the capture mode paused inside rule-hooked
modules.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import graph_nodes
from lrpkit import composites, rules
from lrpkit.attribution import Gradient
from lrpkit.core import produced_nonnegative
from lrpkit.rules import divide, stabilize


def reference_stabilize(value: torch.Tensor, epsilon: float) -> torch.Tensor:
    return torch.where(value >= 0, value + epsilon, value - epsilon)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stabilize_matches_the_sign_convention_including_negative_zero(dtype):
    value = torch.tensor([0.0, -0.0, 1.5, -1.5, 1e-9, -1e-9, float("inf"), float("nan")], dtype=dtype)
    result = stabilize(value, 1e-6)
    torch.testing.assert_close(result, reference_stabilize(value, 1e-6), equal_nan=True, rtol=0, atol=0)
    assert result[1] > 0  # -0.0 is stabilised upwards, like +0.0 (zennit: sign(0) = +1)


def test_divide_does_not_modify_its_arguments_and_keeps_autograd():
    relevance, denominator = torch.randn(3, 4), torch.randn(3, 4)
    copies = relevance.clone(), denominator.clone()
    expected = relevance / reference_stabilize(denominator, 1e-3)
    torch.testing.assert_close(divide(relevance, denominator, 1e-3), expected)
    assert torch.equal(relevance, copies[0]) and torch.equal(denominator, copies[1])
    leaf = denominator.clone().requires_grad_(True)
    divide(relevance, leaf, 1e-3).sum().backward()
    assert leaf.grad is not None


def test_divide_broadcasts_like_plain_division():
    relevance, denominator = torch.randn(2, 3, 4), torch.rand(1, 3, 1) + 0.5
    torch.testing.assert_close(divide(relevance, denominator, 1e-6), relevance / (denominator + 1e-6))


def test_nonnegative_flags_follow_relu_and_pooling_but_not_signed_tensors():
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    assert produced_nonnegative(torch.relu(x))
    assert produced_nonnegative(nn.functional.max_pool2d(torch.relu(x), 2).flatten(1))
    assert produced_nonnegative(torch.sigmoid(x))
    assert not produced_nonnegative(x)
    assert not produced_nonnegative(x * 2)
    assert not produced_nonnegative(nn.functional.max_pool2d(x, 2))
    assert not produced_nonnegative(torch.relu(x) - 1)


class Spy(rules.ZPlus):
    """ZPlus that records what the graph said about its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.flags: list[tuple[bool, ...]] = []

    def relevance(self, call, relevance):
        self.flags.append(call.known_nonnegative)
        return super().relevance(call, relevance)


def test_rule_hooks_see_relu_outputs_as_known_nonnegative():
    spy = Spy()
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).eval()
    composite = composites.LayerMapComposite([(nn.Linear, spy), (nn.ReLU, rules.Pass())])
    Gradient(model, composite)(torch.randn(2, 4), target=0)
    assert sorted(spy.flags) == [(False,), (False,), (True,)]  # input, tanh output: unknown; relu: known


def test_known_nonnegative_shortcut_equals_the_checked_result():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 3, 2), nn.Flatten()).double().eval()
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    composite = composites.LayerMapComposite([(nn.Conv2d, rules.Gamma(0.5)), (nn.ReLU, rules.Pass())])
    fast = Gradient(model, composite)(x, target=1).relevance
    import lrpkit.core as core

    original = core.produced_nonnegative
    core.produced_nonnegative = lambda tensor, depth=8: False  # force the checked path
    try:
        checked = Gradient(model, composite)(x, target=1).relevance
    finally:
        core.produced_nonnegative = original
    torch.testing.assert_close(fast, checked, rtol=1e-12, atol=1e-12)


def alpha_beta_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relevance: torch.Tensor, alpha: float = 2.0, beta: float = 1.0
) -> torch.Tensor:
    """Alpha-beta on a dense layer with non-negative input, in float64, from the formula."""
    x, weight, bias, relevance = (t.double() for t in (x, weight, bias, relevance))
    contributions = x[:, None, :] * weight[None]  # (batch, out, in)
    positive = contributions.clamp(min=0).sum(-1) + bias.clamp(min=0)
    negative = contributions.clamp(max=0).sum(-1) + bias.clamp(max=0)
    share_pos = contributions.clamp(min=0) / reference_stabilize(positive, 1e-6)[..., None]
    share_neg = contributions.clamp(max=0) / reference_stabilize(negative, 1e-6)[..., None]
    return ((alpha * share_pos - beta * share_neg) * relevance[..., None]).sum(1)


def test_alpha_beta_falls_back_to_the_direct_negative_part_under_cancellation():
    # z- is 1e-9 against z+ = 1: in float32, z - z+ is 0 (pure rounding); the guard must notice
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1e-9]]))
        layer.bias.zero_()
    x = torch.tensor([[1.0, 1.0]])
    composite = composites.LayerMapComposite([(nn.Linear, rules.AlphaBeta(2, 1))])
    relevance = Gradient(nn.Sequential(layer), composite)(x, target=0).relevance
    expected = alpha_beta_reference(x, layer.weight.detach(), layer.bias.detach(), torch.ones(1, 1) * float(layer(x).detach()))
    torch.testing.assert_close(relevance.double(), expected, rtol=1e-5, atol=1e-7)


def test_alpha_beta_shortcut_matches_the_formula_on_random_layers():
    torch.manual_seed(1)
    layer = nn.Linear(6, 4)
    x = torch.rand(3, 6)
    composite = composites.LayerMapComposite([(nn.Linear, rules.AlphaBeta(2, 1))])
    start = torch.randn(3, 4)
    relevance = Gradient(nn.Sequential(layer), composite)(x, target=lambda output: start).relevance
    expected = alpha_beta_reference(x, layer.weight.detach(), layer.bias.detach(), start)
    torch.testing.assert_close(relevance.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("alpha", "beta"), [(2.0, 1.0), (1.5, 0.5), (4.0, 3.0)])
@pytest.mark.parametrize("generic", [False, True], ids=["dense ops", "generic ops"])
def test_alpha_beta_never_builds_the_negative_weights_when_z_minus_comes_from_the_output(monkeypatch, alpha, beta, generic):
    from lrpkit import ops

    built = []  # every parameter set a forward or transposed product was asked to use
    for cls in (ops.DenseOps, ops.LayerOps):
        for method in ("forward", "transpose", "linearize"):
            original = getattr(cls, method)
            monkeypatch.setattr(
                cls, method, lambda self, inputs, params, *rest, _f=original, **kwargs: built.append(params["weight"]) or _f(self, inputs, params, *rest, **kwargs)
            )
    torch.manual_seed(8)
    linear = nn.Linear(6, 5).double().eval()
    layer = FunctionalLinear(linear) if generic else linear
    x = torch.rand(3, 6, dtype=torch.float64)
    start = torch.randn(3, 5, dtype=torch.float64)
    composite = composites.NameMapComposite([([""], rules.AlphaBeta(alpha, beta))], canonizers=[])
    _, relevance = Gradient(layer, composite)(x, lambda output: start)
    expected = alpha_beta_reference(x, linear.weight.detach(), linear.bias.detach(), start, alpha, beta)
    torch.testing.assert_close(relevance, expected, rtol=1e-10, atol=1e-12)
    assert built and not any(bool((weight <= 0).all()) for weight in built)  # W+ and W only


def test_alpha_beta_lets_w_plus_and_its_quotient_go_before_the_product_with_the_plain_weight(monkeypatch):
    import gc
    import weakref

    from lrpkit import ops

    made = []  # weak references to W+ and z+ (later u) from the modified forward
    alive_at_plain_product = []
    linearize, transpose = ops.DenseOps.linearize, ops.DenseOps.transpose

    def recording_linearize(self, inputs, params):  # type: ignore[no-untyped-def]
        output, product = linearize(self, inputs, params)
        made.extend([weakref.ref(params["weight"]), weakref.ref(output)])
        return output, product

    def recording_transpose(self, inputs, params, grad, owned=False):  # type: ignore[no-untyped-def]
        gc.collect()
        alive_at_plain_product.append([reference() is not None for reference in made])
        return transpose(self, inputs, params, grad, owned)

    monkeypatch.setattr(ops.DenseOps, "linearize", recording_linearize)
    monkeypatch.setattr(ops.DenseOps, "transpose", recording_transpose)
    torch.manual_seed(9)
    layer = nn.Linear(6, 5).double().eval()
    composite = composites.LayerMapComposite([(nn.Linear, rules.AlphaBeta(2, 1))], canonizers=[])
    Gradient(layer, composite)(torch.rand(3, 6, dtype=torch.float64), lambda output: torch.randn(3, 5, dtype=torch.float64))
    assert alive_at_plain_product == [[False, False]]


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x) - torch.relu(x)


def test_captured_sum_transpose_equals_the_autograd_transpose():
    torch.manual_seed(2)
    model = Residual().double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    composite = composites.EpsilonPlus()
    fast = Gradient(model, composite)(x, target=1).relevance
    from lrpkit.ops import FunctionalOps

    original = FunctionalOps._sum_signs
    FunctionalOps._sum_signs = lambda self, grad: None  # force the autograd path
    try:
        slow = Gradient(model, composite)(x, target=1).relevance
    finally:
        FunctionalOps._sum_signs = original
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


class Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(x).sum(1, keepdim=True) + x.mean()


def test_capture_mode_is_off_the_stack_after_an_exception_inside_a_hooked_module():
    model = nn.Sequential(Failing(), nn.Linear(1, 1)).eval()

    def explode(module, args, output):
        raise RuntimeError("boom inside the hooked layer")

    handle = model[0].linear.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            Gradient(model, composites.EpsilonPlus())(torch.rand(2, 3), target=0)
    finally:
        handle.remove()
    assert torch._C._len_torch_function_stack() == 0
    output, relevance = Gradient(model, composites.EpsilonPlus())(torch.rand(2, 3), target=0)
    assert torch.isfinite(relevance).all()


def rule_nodes(output: torch.Tensor) -> list:
    """The autograd nodes of lrpkit's rules behind ``output``."""
    return [node for node in graph_nodes(output) if getattr(node, "pending", None) is not None]


def test_rules_keep_only_the_tensors_they_need():
    # Pass needs no input values and z+ no output: their nodes must not keep the activation
    # maps alive (a plain gradient with an in-place ReLU keeps one map per layer)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.Flatten()).eval()
    composite = composites.LayerMapComposite([(nn.Conv2d, rules.ZPlus()), (nn.ReLU, rules.Pass())])
    with composite.context(model):
        x = torch.rand(1, 1, 8, 8, requires_grad=True)
        output = model(x)
        nodes = {type(node.pending.module).__name__ + str(i): node for i, node in enumerate(rule_nodes(output))}
        kept = {name: len(node.saved_tensors) for name, node in nodes.items()}
        held = [arg for node in nodes.values() for arg in node.pending.args if isinstance(arg, torch.Tensor)]
        (relevance,) = torch.autograd.grad(output, x, output.detach())
    assert all(count == (1 if name.startswith("Conv") else 0) for name, count in kept.items()) and len(kept) == 3
    assert held == []
    assert relevance.shape == x.shape and torch.isfinite(relevance).all()


def test_gamma_on_signed_input_computes_only_the_part_that_carries_relevance(monkeypatch):
    # relevance only where z > 0 (a ReLU follows): the z < 0 path (two more products) is skipped
    from lrpkit.ops import DenseOps

    calls = []
    original = DenseOps.linearize
    monkeypatch.setattr(DenseOps, "linearize", lambda self, inputs, params: calls.append(1) or original(self, inputs, params))
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)).double().eval()
    composite = composites.NameMapComposite([("0", rules.Gamma(0.25)), ("1", rules.Pass()), ("2", rules.Epsilon())])
    x = torch.randn(3, 4, dtype=torch.float64)  # signed: the two-path form
    relevance = Gradient(model, composite)(x, target=0).relevance
    assert len(calls) == 2 and torch.isfinite(relevance).all()


def _gamma_reference(layer: nn.Linear, x: torch.Tensor, relevance: torch.Tensor, gamma: float) -> torch.Tensor:
    """Gamma by its definition: lifted weights where z > 0, lowered where z < 0, nothing at z == 0."""
    weight, bias = layer.weight.detach(), layer.bias.detach()
    z = x @ weight.T + bias
    result = torch.zeros_like(x)
    for modify, mask in ((lambda v: v + gamma * v.clamp(min=0), z > 0), (lambda v: v + gamma * v.clamp(max=0), z < 0)):
        modified = x @ modify(weight).T + modify(bias)
        share = torch.where(mask, relevance, 0.0) / stabilize(modified, 1e-6)
        result += x * (share @ modify(weight))
    return result


@pytest.mark.parametrize("where", ["both signs", "z > 0 only"])
def test_gamma_on_outputs_of_both_signs_matches_its_definition_with_the_fewest_products(monkeypatch, where):
    from lrpkit.ops import DenseOps

    calls = []  # transposed products, through transpose() or through linearize()'s closure
    transpose, linearize = DenseOps.transpose, DenseOps.linearize

    def counted_linearize(self, inputs, params):  # type: ignore[no-untyped-def]
        output, product = linearize(self, inputs, params)
        return output, lambda grad, owned=False: calls.append(1) or product(grad, owned)

    monkeypatch.setattr(DenseOps, "transpose", lambda self, *args, **kwargs: calls.append(1) or transpose(self, *args, **kwargs))
    monkeypatch.setattr(DenseOps, "linearize", counted_linearize)
    torch.manual_seed(6)
    layer = nn.Linear(5, 7).double().eval()
    x = torch.rand(4, 5, dtype=torch.float64)  # non-negative: the single-path form
    weights = torch.rand(4, 7, dtype=torch.float64)

    def start(output: torch.Tensor) -> torch.Tensor:
        # "z > 0 only": as below a ReLU that does not lend its output
        return (output.clamp(min=0) if where == "z > 0 only" else output) * weights

    composite = composites.LayerMapComposite([(nn.Linear, rules.Gamma(0.25))], canonizers=[])
    output, relevance = Gradient(layer, composite)(x, start)
    assert (output > 0).any() and (output < 0).any()
    torch.testing.assert_close(relevance, _gamma_reference(layer, x, start(output), 0.25), rtol=1e-10, atol=1e-12)
    assert len(calls) == (2 if where == "both signs" else 1)


class FunctionalLinear(nn.Module):
    """``F.linear`` in a module of its own: no closed form, the generic (autograd) layer ops."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("where", ["both signs", "z > 0 only"])
def test_gamma_on_outputs_of_both_signs_through_the_generic_layer_ops(where):
    from lrpkit.ops import layer_ops

    torch.manual_seed(7)
    linear = nn.Linear(5, 7).double().eval()
    layer = FunctionalLinear(linear)
    x = torch.rand(4, 5, dtype=torch.float64)
    assert not layer_ops(layer, (x,), {}, (0,)).fresh  # outputs that must not be overwritten
    weights = torch.rand(4, 7, dtype=torch.float64)

    def start(output: torch.Tensor) -> torch.Tensor:
        return (output.clamp(min=0) if where == "z > 0 only" else output) * weights

    composite = composites.NameMapComposite([([""], rules.Gamma(0.25))], canonizers=[])
    output, relevance = Gradient(layer, composite)(x, start)
    torch.testing.assert_close(relevance, _gamma_reference(linear, x, start(output), 0.25), rtol=1e-10, atol=1e-12)


# -- the stabiliser's ``+ 0.0`` pass, skipped where the output cannot hold -0.0 ------------------


def _zero_output_linear() -> nn.Linear:
    """``z = x1 + x2`` with zero bias: exactly 0 for ``x = (1, -1)``, so the stabiliser's sign matters."""
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.0]]))
        layer.bias.zero_()
    return layer


def _epsilon_relevance(model: nn.Module) -> torch.Tensor:
    composite = composites.LayerMapComposite([(nn.Linear, rules.Epsilon(epsilon=1e-3))], canonizers=[])
    _, relevance = Gradient(model, composite)(torch.tensor([[1.0, -1.0]]), lambda output: torch.ones_like(output))
    return relevance


def test_a_forward_hook_that_writes_negative_zero_gets_the_upward_stabiliser():
    layer = _zero_output_linear()
    layer.register_forward_hook(lambda module, args, output: torch.where(output == 0, -0.0, output))
    # R_in = x * w * R / stab(z) with stab(-0.0) = +eps (sign(0) = +1): (+1000, -1000)
    torch.testing.assert_close(_epsilon_relevance(layer), torch.tensor([[1000.0, -1000.0]]))


def test_the_negative_zero_shortcut_only_applies_to_standard_unhooked_layers_with_a_clean_bias():
    from lrpkit.ops import layer_ops

    def flag(module: nn.Module) -> bool:
        return layer_ops(module, (torch.zeros(1, 2),), {}, (0,)).output_has_no_negative_zero()

    assert flag(_zero_output_linear())
    assert not flag(nn.Linear(2, 1, bias=False))
    with_negative_zero = _zero_output_linear()
    with torch.no_grad():
        with_negative_zero.bias.fill_(-0.0)
    assert not flag(with_negative_zero)  # the cached verdict follows the in-place change
    hooked = _zero_output_linear()
    hooked.register_forward_hook(lambda module, args, output: None)
    assert not flag(hooked)

    class Shifted(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) - 0.0

    assert not flag(Shifted(2, 1))
    supported = torch.set_flush_denormal(True)
    try:
        assert not flag(_zero_output_linear()) or not supported
    finally:
        torch.set_flush_denormal(False)


def test_outputs_the_rules_compute_skip_the_negative_zero_pass_only_with_a_clean_bias_on_the_cpu():
    from lrpkit.ops import layer_ops

    ops = layer_ops(_zero_output_linear(), (torch.zeros(1, 2),), {}, (0,))
    weight = torch.ones(1, 2)
    assert ops.computes_no_negative_zero({"weight": weight, "bias": torch.zeros(1)})
    assert not ops.computes_no_negative_zero({"weight": weight, "bias": torch.tensor([-0.0])})
    assert not ops.computes_no_negative_zero({"weight": weight})
    supported = torch.set_flush_denormal(True)
    try:
        assert not ops.computes_no_negative_zero({"weight": weight, "bias": torch.zeros(1)}) or not supported
    finally:
        torch.set_flush_denormal(False)


# -- Pass rules skip building a LayerCall ---------------------------------------------------------


class Halve(rules.Pass):
    """A Pass subclass that changes what passes: the general path must run it."""

    def elementwise(self, call, relevance):
        return relevance / 2


def test_pass_subclasses_that_change_the_relevance_are_not_short_cut():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.rand(2, 3)

    def relevance(activation_rule: rules.Rule) -> torch.Tensor:
        composite = composites.LayerMapComposite(
            [(nn.ReLU, activation_rule), (nn.Linear, rules.Epsilon())], canonizers=[]
        )
        return Gradient(model, composite)(x).relevance

    assert rules.Pass().passes_relevance and not Halve().passes_relevance
    torch.testing.assert_close(relevance(Halve()), relevance(rules.Pass()) / 2)


# -- rule hooks run outside every torch-function mode ---------------------------------------------


def test_rule_hooks_make_no_calls_a_torch_function_mode_can_see():
    from torch.overrides import TorchFunctionMode

    class Names(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.rand(2, 3, requires_grad=True)
    with Names() as plain:
        model(x)
    composite = composites.LayerMapComposite([(nn.ReLU, rules.Pass()), (nn.Linear, rules.Epsilon())], canonizers=[])
    with composite.context(model), Names() as hooked:
        model(x)
    assert hooked.seen == plain.seen


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(3, 2), nn.Conv1d(2, 2, 3), nn.Conv2d(2, 2, 3), nn.Conv3d(2, 2, 3),
     nn.ConvTranspose1d(2, 2, 3), nn.ConvTranspose2d(2, 2, 3), nn.ConvTranspose3d(2, 2, 3)],
    ids=lambda layer: type(layer).__name__,
)
def test_torch_layers_take_the_closed_form_ops(layer):
    """torch's own dense and convolution layers (transposed ones too, which inherit ``_ConvNd``'s
    ``_conv_forward`` since torch 2.14) are not taken for layers with a ``forward`` of their own."""
    from lrpkit.ops import ConvOps, DenseOps, layer_ops, standard_forward

    x = torch.rand(1, 3) if isinstance(layer, nn.Linear) else torch.rand(1, 2, *[5] * (layer.weight.ndim - 2))
    assert standard_forward(layer)
    assert isinstance(layer_ops(layer, (x,), {}, (0,)), DenseOps if isinstance(layer, nn.Linear) else ConvOps)
