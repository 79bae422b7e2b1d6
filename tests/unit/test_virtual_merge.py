"""BatchNorm merged without a weight copy (``MergeBatchNorm(virtual_from=...)``, large layers by default).

The virtual merge keeps the layer's own weight and applies the BatchNorm's per-channel scale to
the layer's outputs and output gradients. Every rule must give the relevance of the installed
merge (a new merged weight on the layer), which the rule-reference and zennit tests check
against independent implementations. All in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import hooks_left
from lrpkit import rules
from lrpkit.attribution import Gradient
from lrpkit.canonizers import MergeBatchNorm, NamedMergeBatchNorm
from lrpkit.canonizers import batchnorm as merge_module
from lrpkit.composites import LayerMapComposite, NameMapComposite
from lrpkit.core import LayerCall, Rule
from lrpkit.ops import ConvOps, DenseOps, output_scaling

pytestmark = pytest.mark.filterwarnings("ignore::lrpkit.composites.maps.UncoveredModuleWarning")

RULES = {
    "Epsilon": lambda: rules.Epsilon(),
    "Epsilon-no-bias": lambda: rules.Epsilon(zero_params="bias"),
    "ZPlus": lambda: rules.ZPlus(),
    "AlphaBeta-2-1": lambda: rules.AlphaBeta(2, 1),
    "AlphaBeta-1-0": lambda: rules.AlphaBeta(1, 0),
    "AlphaBeta-4-3-no-bias": lambda: rules.AlphaBeta(4, 3, zero_params="bias"),
    "Gamma": lambda: rules.Gamma(0.25),
    "Gamma-no-bias": lambda: rules.Gamma(0.5, zero_params="bias"),
    "ZPlus-no-bias": lambda: rules.ZPlus(zero_params="bias"),
    "ZBox": lambda: rules.ZBox(-3.0, 3.0),
    "Flat": lambda: rules.Flat(),
    "WSquare": lambda: rules.WSquare(),
}

LAYERS = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: nn.BatchNorm2d(4), (2, 3, 5, 5)),
    "conv1d-no-bias": (lambda: nn.Conv1d(3, 4, 3, bias=False), lambda: nn.BatchNorm1d(4), (2, 3, 7)),
    "linear": (lambda: nn.Linear(6, 5), lambda: nn.BatchNorm1d(5), (3, 6)),
    # weights larger than the outputs: the products scale outputs and gradients instead of the weight
    "conv2d-wide": (lambda: nn.Conv2d(8, 6, 3), lambda: nn.BatchNorm2d(6), (2, 8, 3, 3)),
    "linear-wide": (lambda: nn.Linear(40, 5), lambda: nn.BatchNorm1d(5), (3, 40)),
    "conv2d-reflect": (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), lambda: nn.BatchNorm2d(4), (2, 3, 5, 5)),
    # output channels in the weight's second dimension, per group
    "convtranspose2d-grouped": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        lambda: nn.BatchNorm2d(6),
        (2, 4, 3, 3),
    ),
    "convtranspose1d-wide": (lambda: nn.ConvTranspose1d(12, 3, 2), lambda: nn.BatchNorm1d(3), (2, 12, 2)),
}


@pytest.mark.parametrize(
    "layer_kind, scaled_in_products",
    [("conv2d", False), ("conv2d-wide", True), ("linear-wide", True), ("convtranspose2d-grouped", False), ("convtranspose1d-wide", True)],
)
def test_the_cheaper_of_scaling_the_outputs_and_making_the_merged_weight_is_taken(layer_kind, scaled_in_products):
    """Layers whose weight is smaller than their output get the merged weight for a product."""
    model = model_for(layer_kind, "relu", "relu")
    x = torch.rand(LAYERS[layer_kind][2], dtype=torch.float64)
    with LayerMapComposite([], canonizers=[MergeBatchNorm(cache=False, virtual_from=0)]).context(model):
        model(x)  # merges
        x = model[0](x)
        output = model[1](x)  # the merged layer's output
        ops = (ConvOps if "conv" in layer_kind else DenseOps)(model[1], (x,), {}, (0,))
        params = ops.scaled_params()
        assert ops.output_size(x, params) == output.numel()
        for passes in (1, 2):
            chosen = ops._merged_if_cheaper(params, passes, output.numel)
            assert (chosen is params) is scaled_in_products
            torch.testing.assert_close(ops.forward([x], chosen), output, rtol=1e-12, atol=1e-14)


def model_for(layer_kind: str, before: str, after: str, negative_channel: bool = False, seed: int = 0) -> nn.Sequential:
    """``[ReLU] -> layer -> BatchNorm -> [ReLU] -> Flatten -> Linear``, random float64, eval mode."""
    make_layer, make_norm, _ = LAYERS[layer_kind]
    torch.manual_seed(seed)
    norm = make_norm()
    parts = [nn.ReLU()] if before == "relu" else [nn.Identity()]
    parts += [make_layer(), norm] + ([nn.ReLU()] if after == "relu" else []) + [nn.Flatten(), nn.LazyLinear(3)]
    model = nn.Sequential(*parts)
    model(torch.zeros(LAYERS[layer_kind][2]))  # initialise the lazy head
    model = model.double().eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        if negative_channel:
            norm.weight[0] = -0.7
    return model


def relevance_of(model: nn.Module, x: torch.Tensor, rule: Rule, virtual: bool) -> torch.Tensor:
    composite = NameMapComposite(
        [(["1"], rule), (["5", "4"], rules.Epsilon())], canonizers=[MergeBatchNorm(cache=False, virtual_from=0 if virtual else None)]
    )
    return Gradient(model, composite)(x.clone(), target=0).relevance


@pytest.mark.parametrize("after", ["relu", "none"])
@pytest.mark.parametrize("before", ["relu", "signed"])
@pytest.mark.parametrize("layer_kind", list(LAYERS))
@pytest.mark.parametrize("rule_name", list(RULES))
def test_every_rule_gives_the_relevance_of_the_installed_merge(rule_name, layer_kind, before, after):
    model = model_for(layer_kind, before, after)
    x = torch.randn(LAYERS[layer_kind][2], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    seen = []
    model[1].register_forward_hook(lambda module, args, output: seen.append(output_scaling(module)), prepend=True)
    virtual = relevance_of(model, x, RULES[rule_name](), virtual=True)
    assert seen and all(scaling is not None for scaling in seen[1:])  # [0]: the probe, before the merge
    installed = relevance_of(model, x, RULES[rule_name](), virtual=False)
    assert virtual.abs().sum() > 0
    torch.testing.assert_close(virtual, installed, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("virtual", [True, False])
def test_a_negative_scale_gets_merged_parameters_and_the_same_relevance(virtual):
    model = model_for("conv2d", "relu", "relu", negative_channel=True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    original = model[1].weight
    with LayerMapComposite([], canonizers=[NamedMergeBatchNorm([("1", "2")], virtual_from=0 if virtual else None)]).context(model):
        assert output_scaling(model[1]) is None
        assert model[1].weight is not original
    for rule in ("ZPlus", "Gamma", "AlphaBeta-2-1"):
        torch.testing.assert_close(
            relevance_of(model, x, RULES[rule](), virtual=True), relevance_of(model, x, RULES[rule](), virtual=False),
            rtol=1e-10, atol=1e-12,
        )


def test_the_virtual_merge_leaves_the_parameters_alone_and_keeps_no_copy():
    model = model_for("conv2d", "relu", "relu")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    parameters = [(id(parameter), parameter._version) for parameter in model.parameters()]
    with torch.no_grad():
        expected = model(x)
    merge_module.release_merged()
    with LayerMapComposite([(nn.Conv2d, rules.ZPlus())], canonizers=[MergeBatchNorm(cache=False, virtual_from=0)]).context(model):
        output = model(x)
        assert isinstance(model[2], nn.Identity)  # (its parameters are out of the tree meanwhile)
        assert [(id(parameter), parameter._version) for parameter in model[1].parameters()] == parameters[:2]
        output.sum().backward()
    torch.testing.assert_close(output, expected, rtol=0.0, atol=1e-12)
    assert model[1] not in merge_module._MERGED  # no merged weight was made, let alone kept
    assert output_scaling(model[1]) is None and hooks_left(model) == []
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert [(id(parameter), parameter._version) for parameter in model.parameters()] == parameters


def test_a_custom_rule_sees_the_merged_layer_parameters():
    model = model_for("linear", "relu", "relu")
    fc, bn = model[1], model[2]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    seen: list[dict[str, torch.Tensor]] = []

    class Recording(Rule):
        def relevance(self, call: LayerCall, relevance: torch.Tensor) -> tuple[torch.Tensor, ...]:
            seen.append(call.params())
            return (torch.zeros_like(call.inputs[0]),)

    composite = NameMapComposite([(["1"], Recording())], canonizers=[MergeBatchNorm(cache=False, virtual_from=0)])
    Gradient(model, composite)(torch.rand(3, 6, dtype=torch.float64), target=0)
    (params,) = seen
    assert type(params) is dict  # not the scaled form: custom rules never see an unmerged weight
    torch.testing.assert_close(params["weight"], fc.weight * scale[:, None], rtol=1e-14, atol=0.0)
    torch.testing.assert_close(params["bias"], (fc.bias - bn.running_mean) * scale + bn.bias, rtol=1e-13, atol=1e-15)


def test_the_gradient_through_a_virtual_merge_without_rules_is_the_models_gradient():
    model = model_for("conv2d", "signed", "relu")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    model(x)[:, 0].sum().backward()
    expected = x.grad.clone()
    x.grad = None
    with LayerMapComposite([], canonizers=[MergeBatchNorm(cache=False, virtual_from=0)]).context(model):
        model(x)[:, 0].sum().backward()
        assert output_scaling(model[1]) is not None
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shift_sign", [1.0, -1.0])
def test_the_negative_zero_shortcut_reads_the_summand_of_the_scaled_output(shift_sign):
    """The real output is ``z * scale + shift``: free of ``-0.0`` exactly when ``shift`` is."""
    model = model_for("linear", "relu", "relu")
    with torch.no_grad():
        model[2].running_mean.zero_()
        model[2].bias.fill_(0.0 * shift_sign)  # shift = beta - mean * scale: +0.0 or -0.0
    with LayerMapComposite([], canonizers=[MergeBatchNorm(cache=False, virtual_from=0)]).context(model):
        model(torch.rand(3, 6, dtype=torch.float64))
        ops = DenseOps(model[1], (torch.rand(3, 6, dtype=torch.float64),), {}, (0,))
        assert ops.scaling is not None
        assert ops.output_has_no_negative_zero() is (shift_sign > 0)


def test_scaled_products_equal_the_products_with_the_merged_weight():
    """The ops' own contract: ``ScaledParams`` and the materialised merged weights agree."""
    model = model_for("conv2d", "signed", "relu")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with LayerMapComposite([], canonizers=[MergeBatchNorm(cache=False, virtual_from=0)]).context(model):
        model(x)
        ops = ConvOps(model[1], (x,), {}, (0,))
        scaled, merged = ops.scaled_params(), ops.params()
        assert type(merged) is dict and type(scaled) is not dict
        grad = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(ops.forward([x], scaled), ops.forward([x], merged), rtol=1e-12, atol=1e-14)
        (through_scaled,) = ops.transpose([x], scaled, grad.clone(), owned=True)
        (through_merged,) = ops.transpose([x], merged, grad)
        torch.testing.assert_close(through_scaled, through_merged, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(ops.forward([x], scaled), model[1](x), rtol=1e-12, atol=1e-14)


def test_a_layer_without_a_rule_passes_the_merged_layers_gradient_under_functional_capture():
    """A layer with no rule passes the merged layer's gradient; FunctionalCapture leaves the scaling alone."""
    from lrpkit.canonizers import FunctionalCapture

    model = model_for("conv2d", "signed", "relu")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def relevance(virtual_from: int | None) -> torch.Tensor:
        canonizers = [MergeBatchNorm(cache=False, virtual_from=virtual_from), FunctionalCapture()]
        composite = LayerMapComposite([(nn.Linear, rules.Epsilon())], canonizers=canonizers)
        return Gradient(model, composite)(x, target=0).relevance

    virtual, installed = relevance(0), relevance(None)
    assert virtual.abs().sum() > 0
    torch.testing.assert_close(virtual, installed, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layer_kind", ["conv2d", "conv2d-wide", "linear-wide"])
@pytest.mark.parametrize("rule_name", ["Epsilon", "ZPlus", "Gamma", "AlphaBeta-2-1"])
def test_the_virtual_merge_on_cuda_gives_the_relevance_of_the_installed_merge_on_the_cpu(rule_name, layer_kind):
    model = model_for(layer_kind, "relu", "relu")
    x = torch.randn(LAYERS[layer_kind][2], dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = relevance_of(model, x, RULES[rule_name](), virtual=False)
    on_gpu = relevance_of(model.cuda(), x.cuda(), RULES[rule_name](), virtual=True)
    model.cpu()
    torch.testing.assert_close(on_gpu.cpu(), expected, rtol=1e-9, atol=1e-12)
