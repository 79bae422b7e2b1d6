"""The composite context is transactional and bad input gets a clear error."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import hooks_left

import lrpkit
from lrpkit import composites, rules
from lrpkit.attribution import Gradient
from lrpkit.canonizers import CallbackHandle, Canonizer
from lrpkit.core import RuleHook


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).double().eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_pristine(model: nn.Module, before: dict[str, torch.Tensor], attributes: dict[str, dict]) -> None:
    """Parameters and buffers bitwise equal, no hooks, no added or changed attributes."""
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    for name, module in model.named_modules():
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            module._backward_pre_hooks,
            module._forward_hooks_with_kwargs,
        ):
            assert len(hooks) == 0, (name, hooks)
        assert set(vars(module)) == set(attributes[name]), name
        for key, value in attributes[name].items():
            if not isinstance(value, (dict, torch.Tensor)):
                assert getattr(module, key) == value, (name, key)


def attributes_of(model: nn.Module) -> dict[str, dict]:
    return {name: dict(vars(module)) for name, module in model.named_modules()}


class FailingCanonizer(Canonizer):
    """Changes a weight (undoable), then raises -- or raises on the undo path's partner."""

    def __init__(self) -> None:
        self.applied = False

    def apply(self, model: nn.Module) -> list:
        raise RuntimeError("canonizer failed")


class ScalingCanonizer(Canonizer):
    """A well-behaved canonizer: doubles the first weight, undone exactly."""

    def apply(self, model: nn.Module) -> list:
        layer = model[0]
        original = layer.weight.data.clone()
        with torch.no_grad():
            layer.weight.mul_(2)

        def undo() -> None:
            with torch.no_grad():
                layer.weight.copy_(original)

        return [CallbackHandle(undo)]


def test_context_restores_model_and_removes_hooks() -> None:
    model = small_cnn()
    before, attributes = snapshot(model), attributes_of(model)
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    composite = composites.EpsilonPlusFlat(canonizers=[ScalingCanonizer()])
    with composite.context(model):
        assert model[1].inplace is False
        Gradient(model)(x)
    assert_pristine(model, before, attributes)
    assert model[1].inplace is True


class ClassLevelInplace(nn.Module):
    """An activation whose ``inplace`` flag is a class attribute, not an instance one."""

    inplace = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.relu_() if self.inplace else torch.relu(x)


def test_inplace_flag_of_the_class_is_turned_off_inside_the_context() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), ClassLevelInplace(), nn.Linear(4, 2)).double().eval()
    reference = nn.Sequential(model[0], nn.ReLU(), model[2])
    x = torch.rand(2, 3, dtype=torch.float64)
    composite = composites.LayerMapComposite([(nn.Linear, rules.Epsilon()), (ClassLevelInplace, rules.Pass())])
    with composite.context(model):
        assert model[1].inplace is False
        relevance = Gradient(model)(x, target=1).relevance
    assert model[1].inplace is True
    expected = Gradient(reference, composites.LayerMapComposite([(nn.Linear, rules.Epsilon())]))(x, target=1)
    torch.testing.assert_close(relevance, expected.relevance)


def test_exception_in_canonizer_restores_model() -> None:
    model = small_cnn()
    before, attributes = snapshot(model), attributes_of(model)
    composite = composites.EpsilonPlus(canonizers=[ScalingCanonizer(), FailingCanonizer()])
    with pytest.raises(RuntimeError, match="canonizer failed"):
        with composite.context(model):
            pass
    assert_pristine(model, before, attributes)


def test_exception_in_body_restores_model() -> None:
    model = small_cnn()
    before, attributes = snapshot(model), attributes_of(model)
    with pytest.raises(KeyError, match="body"):
        with composites.EpsilonPlusFlat(canonizers=[ScalingCanonizer()]).context(model):
            model(torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True))
            raise KeyError("body")
    assert_pristine(model, before, attributes)


class ExplodingRule(rules.Rule):
    def relevance(self, call, relevance):
        raise ArithmeticError("rule failed in backward")


def test_exception_in_backward_restores_model() -> None:
    model = small_cnn()
    before, attributes = snapshot(model), attributes_of(model)
    composite = composites.LayerMapComposite(
        [(nn.Linear, ExplodingRule())], canonizers=[ScalingCanonizer()]
    )
    with pytest.raises(ArithmeticError, match="rule failed in backward"):
        Gradient(model, composite)(torch.rand(1, 1, 6, 6, dtype=torch.float64))
    assert_pristine(model, before, attributes)


def test_register_and_remove() -> None:
    model = small_cnn()
    before, attributes = snapshot(model), attributes_of(model)
    composite = composites.EpsilonPlus()
    composite.register(model)
    hooks = list(model[0]._forward_hooks.values())
    assert sum(isinstance(hook, RuleHook) for hook in hooks) == 1
    composite.remove()
    composite.remove()  # idempotent
    assert_pristine(model, before, attributes)


def test_second_context_on_same_model_is_refused() -> None:
    model = small_cnn()
    with composites.EpsilonPlus().context(model):
        with pytest.raises(RuntimeError, match="already inside a composite's context"):
            with composites.EpsilonPlusFlat().context(model):
                pass
        with pytest.raises(RuntimeError, match="already inside a composite's context"):
            with composites.EpsilonPlusFlat().context(model[0]):
                pass
    with composites.EpsilonPlusFlat().context(model):  # free again afterwards
        pass


def test_backward_outside_context_raises() -> None:
    model = small_cnn()
    x = torch.rand(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    with composites.EpsilonPlus().context(model):
        output = model(x)
    with pytest.raises(RuntimeError, match="after its composite context was closed"):
        output.sum().backward()


class Scale(nn.Module):
    """A layer with a parameter that no preset maps; FunctionalCapture explains its ``x * self.scale``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Lerp(nn.Module):
    """``torch.lerp(x, self.anchor, 0.5)``: an op without a rule."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lerp(x, self.anchor.expand_as(x), 0.5)


class AddMM(nn.Module):
    """GPT-2's ``Conv1D``: ``torch.addmm(bias, x, weight)``, captured as a dense layer."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.eye(size)), nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class ScaledInCustomFunction(nn.Module):
    """Its parameter goes into a custom autograd function (whose ``forward`` runs without grad): not explained."""

    class _Multiply(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return x * scale

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return grad, None

    def __init__(self, size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._Multiply.apply(x, self.scale)


def _sandwich(middle: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3), middle, nn.Linear(3, 2)).double()


def _outer_layers_only(strict: bool = False) -> composites.Composite:
    """Rules for the sandwich's outer layers only: its middle ``nn.Linear`` gets none."""
    return composites.NameMapComposite([(["0", "2"], rules.Epsilon())], strict=strict)


@pytest.mark.parametrize(
    ("layer", "composite"),
    [(lambda size: nn.Linear(size, size), _outer_layers_only), (Lerp, composites.EpsilonPlus), (ScaledInCustomFunction, composites.EpsilonPlus)],
    ids=["unmapped nn.Linear", "lerp", "custom function"],
)
def test_module_without_rule_warns_after_the_forward_and_strict_raises(
    layer: Callable[[int], nn.Module], composite: Callable[..., composites.Composite]
) -> None:
    """An ``nn.Linear``'s own ``F.linear`` call is its computation: the composite gave it no rule, the gradient."""
    model = _sandwich(layer(3))
    x = torch.rand(2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with composite().context(model):  # entering says nothing: the calls are not seen yet
            pass
    label = rf"'1' \({type(model[1]).__name__}\)"
    with pytest.warns(composites.UncoveredModuleWarning, match=label):
        Gradient(model, composite())(x)
    with pytest.raises(ValueError, match=label):
        Gradient(model, composite(strict=True))(x)
    assert hooks_left(model) == []


def test_the_check_waits_for_a_forward_that_carries_a_gradient() -> None:
    """An input without ``requires_grad`` puts no activation into any call: nothing can be judged yet."""
    model = _sandwich(Lerp(3))
    x = torch.rand(2, 3, dtype=torch.float64)
    with composites.EpsilonPlus().context(model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(x)
        with pytest.warns(composites.UncoveredModuleWarning, match=r"'1' \(Lerp\)"):
            model(x.requires_grad_(True))


class _SwishFunction(torch.autograd.Function):
    """``x * sigmoid(x)`` with its derivative as backward (a "memory-efficient" swish)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        gate = torch.sigmoid(x)
        return grad * gate * (1 + x * (1 - gate))


class EfficientSwish(nn.Module):
    """An activation without parameters computed in a custom autograd function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwishFunction.apply(x)


class Block(nn.Module):
    """A container whose output is its child's: only the child is named."""

    def __init__(self) -> None:
        super().__init__()
        self.act = EfficientSwish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


def _swish_model(activation: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), activation, nn.Linear(4, 2)).double()


@pytest.mark.parametrize("activation", [EfficientSwish, Block])
def test_output_of_a_custom_autograd_function_is_named(activation: Callable[[], nn.Module]) -> None:
    """Its backward stays (the swish's derivative): relevance is lost, and the warning says which module."""
    model = _swish_model(activation())
    x = torch.rand(2, 3, dtype=torch.float64)
    label = r"'1\.act' \(EfficientSwish: output of _SwishFunction\.apply\)" if activation is Block else (
        r"'1' \(EfficientSwish: output of _SwishFunction\.apply\)"
    )
    with pytest.warns(composites.UncoveredModuleWarning, match=label) as record:
        Gradient(model, composites.EpsilonPlus())(x)
    assert len(record) == 1  # the container returning the same output is not named again
    with pytest.raises(ValueError, match=label):
        Gradient(model, composites.EpsilonPlus(strict=True))(x)
    assert hooks_left(model) == []


class CallsSwish(nn.Module):
    """A custom autograd function called in the middle of a forward: into a layer, or into a captured call."""

    def __init__(self, into: str) -> None:
        super().__init__()
        self.into = into
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = _SwishFunction.apply(self.first(x))
        if self.into == "captured call":
            hidden = hidden * 0.5
        return self.second(hidden)


@pytest.mark.parametrize("into", ["layer", "captured call"])
def test_a_custom_function_called_in_a_forward_names_that_module(into: str) -> None:
    model = CallsSwish(into).double()
    with pytest.warns(composites.UncoveredModuleWarning, match=r"'' \(CallsSwish: its forward calls _SwishFunction\.apply\)"):
        Gradient(model, composites.EpsilonPlus())(torch.rand(2, 3, dtype=torch.float64), target=0)


def test_custom_functions_are_named_by_module_type_and_function() -> None:
    """Many modules of one type: three names, the count of the rest, the type once; a module called twice once."""
    twice = EfficientSwish()
    layers: list[nn.Module] = [nn.Linear(3, 3), twice, twice]
    for _ in range(4):
        layers += [nn.Linear(3, 3), EfficientSwish()]
    model = nn.Sequential(*layers).double()
    pattern = r"'1', '4', '6' and 2 more \(EfficientSwish: output of _SwishFunction\.apply\);"
    with pytest.warns(composites.UncoveredModuleWarning, match=pattern):
        Gradient(model, composites.EpsilonPlus())(torch.rand(2, 3, dtype=torch.float64), target=0)


def test_custom_autograd_function_mapped_to_pass_is_explained() -> None:
    """With ``Pass`` the module explains like ``nn.SiLU`` (an activation): no warning, the same relevance."""
    x = torch.rand(2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapped = Gradient(_swish_model(EfficientSwish()), composites.EpsilonPlus(layer_map=[(EfficientSwish, rules.Pass())]))(x)
        builtin = Gradient(_swish_model(nn.SiLU()), composites.EpsilonPlus())(x)
    torch.testing.assert_close(mapped.relevance, builtin.relevance, rtol=1e-12, atol=1e-15)
    with pytest.warns(composites.UncoveredModuleWarning):
        without = Gradient(_swish_model(EfficientSwish()), composites.EpsilonPlus())(x)
    assert (without.relevance - builtin.relevance).abs().max() > 1e-3  # the derivative differs from Pass


def test_custom_function_with_parameters_is_named_once() -> None:
    """A module named for its parameters is not named again for the Function that computes its output."""
    model = _sandwich(ScaledInCustomFunction(3))
    with pytest.warns(composites.UncoveredModuleWarning) as record:
        Gradient(model, composites.EpsilonPlus())(torch.rand(2, 3, dtype=torch.float64))
    assert len(record) == 1 and "with parameters" in str(record[0].message)


class Router(nn.Linear):
    """A mixture of experts' router (Phi-MoE's, Llama 4's): an ``nn.Linear`` whose forward returns a tuple."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = super().forward(x)
        return logits, torch.softmax(logits, dim=-1)


class Routed(nn.Module):
    """A layer's output scaled by a routing weight: the weight is a gate and gets no relevance."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 4, bias=False)
        self.router = Router(3, 2, bias=False)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, weights = self.router(x)
        return self.head(torch.relu(self.layer(x)) * weights[:, :1])


def test_a_layer_returning_a_tuple_says_how_to_map_it_and_is_then_explained() -> None:
    torch.manual_seed(3)
    model = Routed().double()
    x = torch.rand(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"'router' \(Router\), which returned tuple.*layer_map=\[\(Router, None\)\]"):
        Gradient(model, composites.EpsilonPlus())(x)
    assert hooks_left(model) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = Gradient(model, composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12, layer_map=[(Router, None)]))(x, target=0)
    torch.testing.assert_close(result.relevance.sum(1), result.output[:, 0], rtol=1e-9, atol=1e-12)


class OwnLinear(nn.Module):
    """A custom dense layer (no torch layer class): its ``F.linear`` call is captured as a dense layer."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ExpScale(nn.Module):
    """A factor computed from the parameter alone (Swin V2's ``logit_scale``): constant calls, then a product."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.log_scale.clamp(max=4.6).exp()


class PositionTable(nn.Module):
    """A bias gathered from a table (a relative position bias), added to the input."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(2 * size))
        self.register_buffer("index", torch.arange(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[self.index].view(1, -1)


@pytest.mark.parametrize("layer", [Scale, ExpScale, PositionTable, OwnLinear, AddMM])
def test_module_whose_parameters_enter_explained_calls_gets_no_warning(layer: Callable[[int], nn.Module]) -> None:
    """Its parameters enter a captured product or sum as constants: explained, no warning."""
    model = _sandwich(layer(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Gradient(model, composites.EpsilonPlus(strict=True))(torch.rand(2, 3, dtype=torch.float64))


class SkipsAModule(nn.Module):
    """Holds a module it does not call here (a text model's token embedding, given embeddings)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = ScaledInCustomFunction(3)
        self.layer = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class LerpContainer(Lerp):
    """A ``Lerp`` with a child module (Mixtral's experts hold their activation)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.act(x))


class CachedTable(nn.Module):
    """A container that adds a table computed once without grad and cached (LeViT's attention biases)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.ones(size))
        self.act = nn.ReLU()
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            with torch.no_grad():
                self.cache = self.table * 0.5
        return self.act(x) + self.cache


def test_container_warns_when_its_own_parameters_keep_their_gradient() -> None:
    """Before, a module with children was never named: Mixtral's experts (``torch._grouped_mm``)."""
    with pytest.raises(ValueError, match=r"'1' \(LerpContainer\)"):
        Gradient(_sandwich(LerpContainer(3)), composites.EpsilonPlus(strict=True))(torch.rand(2, 3, dtype=torch.float64))
    with warnings.catch_warnings():  # its parameters go into no call the capture sees: not named
        warnings.simplefilter("error")
        Gradient(_sandwich(CachedTable(3)), composites.EpsilonPlus(strict=True))(torch.rand(2, 3, dtype=torch.float64))


def test_module_that_did_not_run_gets_no_warning() -> None:
    model = SkipsAModule().double()
    x = torch.rand(2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Gradient(model, composites.EpsilonPlus(strict=True))(x)
    model.forward = lambda x: model.layer(model.unused(x))  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"'unused' \(ScaledInCustomFunction\)"):
        Gradient(model, composites.EpsilonPlus(strict=True))(x)


def test_module_without_rule_warns_on_entry_without_functional_capture() -> None:
    model = _sandwich(Scale(3))
    with pytest.warns(composites.UncoveredModuleWarning, match=r"'1' \(Scale\)"):
        with composites.EpsilonPlus(canonizers=[]).context(model):
            pass
    with pytest.raises(ValueError, match=r"'1' \(Scale\)"):
        with composites.EpsilonPlus(canonizers=[], strict=True).context(model):
            pass
    assert hooks_left(model) == []


@pytest.mark.parametrize(
    ("target", "error", "pattern"),
    [
        (10, ValueError, r"target class 10 is out of range .* 5 classes"),
        (-1, ValueError, "out of range"),
        ([0, 1, 2], ValueError, "got 3 targets for a batch of 2"),
        (torch.zeros(2, 3), ValueError, r"shape \(2, 3\) but the output has shape \(2, 5\)"),
        (torch.zeros(2, 2, dtype=torch.long), TypeError, "one integer class per sample"),
        ("cat", TypeError, "one integer class per sample|unsupported target"),
        (True, TypeError, "not a bool"),
        (lambda out: out[:, 0], ValueError, "callable target's result has shape"),
    ],
)
def test_bad_targets(target, error, pattern) -> None:
    model = small_cnn()
    with pytest.raises(error, match=pattern):
        Gradient(model, composites.EpsilonPlus())(torch.rand(2, 1, 6, 6, dtype=torch.float64), target=target)


def test_integer_input_is_refused() -> None:
    with pytest.raises(TypeError, match=r"floating-point tensor .* x.float\(\)"):
        Gradient(small_cnn())(torch.ones(1, 1, 6, 6, dtype=torch.long))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.policy = nn.Linear(6, 3)
        self.value = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor):
        hidden = torch.relu(self.body(x))
        return {"policy": self.policy(hidden), "value": self.value(hidden)}


def test_dict_output_needs_a_selector() -> None:
    model = TwoHeads().double()
    x = torch.rand(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"dict with entries \['policy', 'value'\].*output="):
        Gradient(model)(x)
    result = Gradient(model, composites.EpsilonPlus(), output="policy")(x, target=1)
    assert result.output.shape == (2, 3)
    value = Gradient(model, composites.EpsilonPlus(), output=lambda out: out["value"])(x, target=0)
    assert value.relevance.shape == (2, 4)
    with pytest.raises(TypeError, match="does not select"):
        Gradient(model, output="missing")(x)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: rules.AlphaBeta(alpha=1, beta=1), "alpha - beta must equal 1"),
        (lambda: rules.AlphaBeta(alpha=-1, beta=-2), "alpha and beta must both be >= 0"),
        (lambda: rules.Gamma(gamma=-0.1), "gamma must be >= 0"),
        (lambda: rules.Epsilon(epsilon=-1), "epsilon must be >= 0"),
        (lambda: rules.ZPlus(stabilizer=-1), "stabilizer must be >= 0"),
    ],
)
def test_impossible_rule_parameters(make, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()


def test_rule_on_module_with_tuple_output_raises_clearly() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(x), x

    model = nn.Sequential(Pair())
    composite = composites.NameMapComposite([("0", rules.Epsilon())])
    with pytest.raises(TypeError, match=r"'0' \(Pair\), which returned tuple"):
        Gradient(model, composite, output=0)(torch.rand(1, 3))


def test_pass_on_non_elementwise_module_raises() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    composite = composites.LayerMapComposite([(nn.Linear, rules.Pass())])
    with pytest.raises(ValueError, match=r"Pass needs an element-wise module.*'0' \(Linear\)"):
        Gradient(model, composite)(torch.rand(1, 3))


def test_first_layer_is_first_in_execution_order() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.Linear(4, 2)  # registered first, runs last
            self.early = nn.Linear(3, 4)

        def forward(self, x):
            return self.late(torch.relu(self.early(x)))

    torch.manual_seed(1)
    model = Reversed().double()
    x = torch.rand(2, 3, dtype=torch.float64)
    composite = composites.SpecialFirstLayerMapComposite(
        [(nn.Linear, rules.Epsilon())], [(nn.Linear, rules.Flat())], canonizers=[]
    )
    reference = composites.NameMapComposite([("early", rules.Flat()), ("late", rules.Epsilon())], canonizers=[])
    ours = Gradient(model, composite)(x).relevance
    expected = Gradient(model, reference)(x).relevance
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    wrong = composites.NameMapComposite([("early", rules.Epsilon()), ("late", rules.Flat())], canonizers=[])
    assert not torch.allclose(ours, Gradient(model, wrong)(x).relevance)


def test_name_map_globs_and_callables() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.rand(2, 3, dtype=torch.float64)
    by_glob = composites.NameMapComposite([("[02]", rules.ZPlus()), ("4", rules.Epsilon())], canonizers=[])
    by_callable = composites.NameMapComposite(
        [(lambda name, module: name in {"0", "2"}, rules.ZPlus()), (["4"], rules.Epsilon())], canonizers=[]
    )
    by_type = composites.MixedComposite(
        [
            composites.NameMapComposite([("4", rules.Epsilon())]),
            composites.LayerMapComposite([(nn.Linear, rules.ZPlus())]),
        ],
        canonizers=[],
    )
    first = Gradient(model, by_glob)(x).relevance
    torch.testing.assert_close(first, Gradient(model, by_callable)(x).relevance, rtol=1e-12, atol=0)
    torch.testing.assert_close(first, Gradient(model, by_type)(x).relevance, rtol=1e-12, atol=0)


def test_explain_and_registry() -> None:
    model = small_cnn()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    output, relevance = lrpkit.explain(model, x)
    expected = Gradient(model, composites.EpsilonPlusFlat())(x).relevance
    torch.testing.assert_close(relevance, expected)
    assert lrpkit.explain(model, x, composite="epsilon_gamma_box").relevance.shape == x.shape
    plain = lrpkit.explain(model, x, composite=None)
    assert plain.relevance.shape == x.shape
    with pytest.raises(KeyError, match="no composite named 'nope'; known: deconvnet"):
        composites.get("nope")


def test_plain_gradient_without_composite_is_untouched_autograd() -> None:
    model = small_cnn()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    output = model(x)
    start = torch.zeros_like(output)
    start[range(2), output.argmax(1)] = output.detach()[range(2), output.argmax(1)]
    (expected,) = torch.autograd.grad(output, x, start)
    torch.testing.assert_close(Gradient(copy.deepcopy(model))(x).relevance, expected)


# -- torch.compile: rules are eager hooks ------------------------------------------------------
def test_attributors_explain_the_module_a_compiled_model_wraps() -> None:
    """Nothing is compiled: the attributor explains ``_orig_mod``, the same function, eagerly."""
    model = small_cnn()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = Gradient(model, composites.EpsilonPlusFlat())(x, target=1)
    compiled = torch.compile(model)
    result = Gradient(compiled, composites.EpsilonPlusFlat())(x, target=1)
    assert torch.equal(result.relevance, expected.relevance)
    assert [row.name for row in lrpkit.describe(compiled, x).rows] == [row.name for row in lrpkit.describe(model, x).rows]


def test_a_context_on_a_compiled_model_says_what_to_explain_instead() -> None:
    model = small_cnn()
    compiled = torch.compile(model)
    before, attributes = snapshot(model), attributes_of(model)
    with pytest.raises(TypeError, match=r"compiled with torch.compile.*model\._orig_mod"):
        with composites.EpsilonPlusFlat().context(compiled):
            pass
    assert_pristine(model, before, attributes)


def test_a_compiled_submodule_is_named() -> None:
    model = nn.Sequential(torch.compile(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.raises(TypeError, match=r"module '0' was compiled with torch.compile.*\._orig_mod"):
        Gradient(model, composites.EpsilonPlus())(torch.rand(2, 4), target=0)


# -- TorchScript: compiled code runs no hooks --------------------------------------------------
@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script is deprecated in favour of torch.compile
@pytest.mark.parametrize("how", ["script", "trace"])
def test_a_torchscript_model_or_submodule_is_refused_with_what_to_do(how: str) -> None:
    layer = nn.Linear(4, 4).eval()
    x = torch.rand(2, 4)
    scripted = torch.jit.script(layer) if how == "script" else torch.jit.trace(layer, x)
    with pytest.raises(TypeError, match=r"the model is a TorchScript module.*load the same state_dict"):
        Gradient(scripted, composites.EpsilonPlus())(x, target=0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), scripted).eval()
    before, attributes = snapshot(model[0]), attributes_of(model[0])
    with pytest.raises(TypeError, match=r"module '2' is a TorchScript module"):
        Gradient(model, composites.EpsilonPlus())(x, target=0)
    assert_pristine(model[0], before, attributes)


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_parametrized_weights_are_read_as_the_layer_computes_them(composite: str) -> None:
    """Weight norm and spectral norm (``torch.nn.utils.parametrizations``, and the old hook-based
    ``weight_norm``) compute the weight on access: the rules see that weight, the relevance equals
    the plain model's with the same weights, and the parametrizations stay as they were."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double().eval()
    model = copy.deepcopy(plain)
    parametrizations.weight_norm(model[0])
    parametrizations.spectral_norm(model[6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated
        torch.nn.utils.weight_norm(model[2])
    model.eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    model(x)  # the old weight_norm computes its weight in a forward pre-hook
    with torch.no_grad():
        for index in (0, 2, 6):
            plain[index].weight.copy_(model[index].weight)
    state = copy.deepcopy(model.state_dict())
    ours, reference = lrpkit.explain(model, x, composite), lrpkit.explain(plain, x, composite)
    assert torch.allclose(ours.output, reference.output, rtol=1e-12)
    assert torch.allclose(ours.relevance, reference.relevance, rtol=1e-10, atol=1e-14)
    assert parametrizations.parametrize.is_parametrized(model[0], "weight")
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


class Checkpointed(nn.Module):
    """A block run under activation checkpointing (recomputed in the backward), or plainly."""

    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.block = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU())
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            return self.head(torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False))
        return self.head(self.block(x))


def test_activation_checkpointing_gives_the_same_relevance() -> None:
    """``torch.utils.checkpoint`` (non-reentrant) runs the block again in the backward, with the rules' hooks."""
    torch.manual_seed(0)
    plain = Checkpointed(False).double().eval()
    checkpointed = Checkpointed(True).double().eval()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.rand(3, 6, dtype=torch.float64)
    expected = Gradient(plain, composites.EpsilonPlus())(x, target=1).relevance
    torch.testing.assert_close(Gradient(checkpointed, composites.EpsilonPlus())(x, target=1).relevance, expected)
