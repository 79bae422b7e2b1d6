"""SmoothGrad, IntegratedGradients, GradientXInput, Sensitivity and Occlusion.

Properties checked on tiny float64 models: reductions to simpler methods (no noise, one step),
completeness of Integrated Gradients, hand computations on linear models, batch independence,
the progress bar, errors that name the argument, and that nothing is left on the model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from helpers import hooks_left
from lrpkit import composites, rules, types
from lrpkit.attribution import (
    Attribution,
    Gradient,
    GradientXInput,
    IntegratedGradients,
    Occlusion,
    Sensitivity,
    SmoothGrad,
)
from lrpkit.canonizers import Canonizer, FunctionalCapture

DTYPE = torch.float64
CLOSE = {"rtol": 1e-10, "atol": 1e-12}


def relu_net(bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8, bias=bias), nn.ReLU(), nn.Linear(8, 8, bias=bias), nn.ReLU(), nn.Linear(8, 3, bias=bias)]
    return nn.Sequential(*layers).to(DTYPE).eval()


def smooth_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8), nn.Softplus(), nn.Linear(8, 8), nn.Softplus(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(DTYPE).eval()


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)
    ).to(DTYPE).eval()


def inputs(batch: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 5, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def gradient_of_score(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """d output[:, target] / d x by plain autograd."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return grad


def epsilon_zero() -> composites.Composite:
    return composites.LayerMapComposite([(types.Activation, rules.Pass()), (nn.Linear, rules.Epsilon(epsilon=0.0))])


# ---------------------------------------------------------------------------------------------
# SmoothGrad
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: None, lambda: composites.EpsilonPlus()], ids=["plain", "epsilon_plus"])
def test_smoothgrad_without_noise_is_gradient(make) -> None:
    model, x = relu_net(), inputs()
    expected = Gradient(model, make())(x, target=[0, 1, 2, 0])
    result = SmoothGrad(model, make(), noise=0.0, samples=3, batch_size=5)(x, target=[0, 1, 2, 0])
    torch.testing.assert_close(result.relevance, expected.relevance, **CLOSE)
    torch.testing.assert_close(result.output, expected.output)
    torch.testing.assert_close(result.start, expected.start, **CLOSE)
    assert hooks_left(model) == []


def test_smoothgrad_is_reproducible_and_batch_independent() -> None:
    model, x = relu_net(), inputs(5)
    make = lambda batch_size: SmoothGrad(model, noise=0.3, samples=6, batch_size=batch_size, seed=7)  # noqa: E731
    full = make(4)(x, target=1)
    assert torch.equal(full.relevance, make(4)(x, target=1).relevance)
    torch.testing.assert_close(make(64)(x, target=1).relevance, full.relevance, **CLOSE)
    for index in range(len(x)):
        alone = make(3)(x[index : index + 1], target=1)
        torch.testing.assert_close(alone.relevance[0], full.relevance[index], **CLOSE)
    other_seed = SmoothGrad(model, noise=0.3, samples=6, seed=8)(x, target=1)
    assert not torch.allclose(other_seed.relevance, full.relevance)
    torch.manual_seed(3)
    first = SmoothGrad(model, noise=0.3, samples=6)(x, target=1)
    torch.manual_seed(3)
    assert torch.equal(SmoothGrad(model, noise=0.3, samples=6)(x, target=1).relevance, first.relevance)


def test_smoothgrad_noise_scales_with_the_input_range() -> None:
    # f(x) = w . x: each copy's gradient result is w * f(copy), so the average is w * (f(x) + std * w . mean(z))
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).to(DTYPE)
    x = inputs(2)
    x[1] = 10 * x[0]  # ten times the range: ten times the noise
    result = SmoothGrad(model, noise=0.2, samples=4, seed=0)(x, target=0)
    weight = model.weight.detach()[0]
    clean = (x @ weight)[:, None]
    shift = result.relevance / weight - clean  # std * w . mean(z) per sample
    torch.testing.assert_close(shift[1], 10 * shift[0], **CLOSE)
    assert float(shift[0].abs().min()) > 0


def test_smoothgrad_argmax_target_is_fixed_by_the_clean_input() -> None:
    model, x = relu_net(), inputs()
    result = SmoothGrad(model, noise=1.0, samples=8, seed=0)(x)
    predicted = model(x).argmax(1)
    assert torch.equal(result.start.abs().argmax(1), predicted)
    assert int((result.start != 0).sum()) == len(x)


def test_smoothgrad_enters_the_composite_once() -> None:
    class Counting(Canonizer):
        applied = 0

        def apply(self, model: nn.Module) -> list:
            Counting.applied += 1
            return []

    model, x = relu_net(), inputs()
    composite = composites.EpsilonPlus(canonizers=[Counting(), FunctionalCapture()])
    SmoothGrad(model, composite, samples=10, batch_size=3, seed=0)(x, target=0)
    assert Counting.applied == 1
    assert hooks_left(model) == []


# ---------------------------------------------------------------------------------------------
# Integrated Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("baseline", [None, 0.5, "tensor"])
def test_integrated_gradients_completeness(baseline) -> None:
    model, x = smooth_net(), inputs()
    if baseline == "tensor":
        baseline = torch.linspace(-1, 1, 5, dtype=DTYPE)
    reference = torch.broadcast_to(torch.as_tensor(0.0 if baseline is None else baseline, dtype=DTYPE), x.shape)
    result = IntegratedGradients(model, baseline=baseline, steps=48, batch_size=40)(x, target=2)
    expected = (model(x) - model(reference))[:, 2].detach()
    torch.testing.assert_close(result.relevance.sum(1), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.output, model(x).detach())


def test_integrated_gradients_quadrature_rules() -> None:
    model, x = smooth_net(), inputs()
    baseline = torch.full_like(x, 0.25)

    def ig(steps: int, method: str) -> torch.Tensor:
        attributor = IntegratedGradients(model, baseline=0.25, steps=steps, method=method)  # type: ignore[arg-type]
        return attributor(x, target=1).relevance

    at_baseline, at_input = gradient_of_score(model, baseline, 1), gradient_of_score(model, x, 1)
    torch.testing.assert_close(ig(1, "left"), (x - baseline) * at_baseline, **CLOSE)
    torch.testing.assert_close(ig(1, "right"), (x - baseline) * at_input, **CLOSE)
    torch.testing.assert_close(ig(2, "trapezoid"), (x - baseline) * (at_baseline + at_input) / 2, **CLOSE)
    middle = gradient_of_score(model, (x + baseline) / 2, 1)
    torch.testing.assert_close(ig(1, "middle"), (x - baseline) * middle, **CLOSE)


def test_integrated_gradients_one_right_step_is_gradient_x_input() -> None:
    model, x = relu_net(), inputs()
    for composite in (None, epsilon_zero()):
        ig = IntegratedGradients(model, composite, steps=1, method="right")(x, target=0)
        gxi = GradientXInput(model, composite)(x, target=0)
        torch.testing.assert_close(ig.relevance, gxi.relevance, **CLOSE)


def test_integrated_gradients_on_a_linear_model_is_exact() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3).to(DTYPE)
    x = inputs()
    result = IntegratedGradients(model, baseline=-1.0, steps=3)(x, target=[0, 1, 2, 1])
    expected = (x + 1) * model.weight.detach()[[0, 1, 2, 1]]
    torch.testing.assert_close(result.relevance, expected, **CLOSE)


def test_integrated_gradients_batch_independence() -> None:
    model, x = smooth_net(), inputs(3)
    full = IntegratedGradients(model, steps=8, batch_size=5)(x, target=0)
    for index in range(len(x)):
        alone = IntegratedGradients(model, steps=8, batch_size=64)(x[index : index + 1], target=0)
        torch.testing.assert_close(alone.relevance[0], full.relevance[index], **CLOSE)


def test_integrated_gradients_at_a_layer_is_complete_for_the_layer_score() -> None:
    model, x = smooth_net(), inputs()
    result = IntegratedGradients(model, steps=48, batch_size=64)(x, target=4, layer="1")
    head = model[:2]
    expected = (head(x) - head(torch.zeros_like(x)))[:, 4].detach()
    torch.testing.assert_close(result.output, head(x).detach())
    torch.testing.assert_close(result.relevance.sum(1), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradient x Input and Sensitivity
# ---------------------------------------------------------------------------------------------


def test_gradient_x_input_is_lrp_zero_on_a_relu_net_without_bias() -> None:
    model, x = relu_net(bias=False), inputs()
    gxi = GradientXInput(model)(x, target=[2, 0, 1, 1])
    gradients = torch.stack([gradient_of_score(model, x, t)[i] for i, t in enumerate([2, 0, 1, 1])])
    torch.testing.assert_close(gxi.relevance, x * gradients)
    torch.testing.assert_close(gxi.relevance.sum(1), gxi.output[torch.arange(4), [2, 0, 1, 1]], **CLOSE)
    lrp_zero = Gradient(model, epsilon_zero())(x, target=[2, 0, 1, 1])
    torch.testing.assert_close(gxi.relevance, lrp_zero.relevance, **CLOSE)


def test_sensitivity_is_the_squared_gradient() -> None:
    model = small_cnn()
    x = torch.rand(2, 2, 6, 6, dtype=DTYPE)
    gradient = gradient_of_score(model, x, 3)
    result = Sensitivity(model)(x, target=3)
    torch.testing.assert_close(result.relevance, gradient**2, **CLOSE)
    summed = Sensitivity(model, sum_channels=True)(x, target=3)
    torch.testing.assert_close(summed.relevance, (gradient**2).sum(1, keepdim=True), **CLOSE)
    assert isinstance(summed, Attribution) and summed.start is not None


# ---------------------------------------------------------------------------------------------
# Occlusion
# ---------------------------------------------------------------------------------------------


def test_occlusion_on_a_linear_model_by_hand() -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 2).to(DTYPE)
    x = inputs(3)
    weight = model.weight.detach()[1]
    result = Occlusion(model, window=2, stride=1, fill=0.5)(x, target=1)
    # windows [0,1], [1,2], [2,3], [3,4]; the drop of a window is sum over it of w_j (x_j - 0.5)
    contribution = weight * (x - 0.5)
    drops = [contribution[:, start : start + 2].sum(1) for start in range(4)]
    expected = torch.stack(
        [drops[0], (drops[0] + drops[1]) / 2, (drops[1] + drops[2]) / 2, (drops[2] + drops[3]) / 2, drops[3]], dim=1
    )
    torch.testing.assert_close(result.relevance, expected, **CLOSE)
    torch.testing.assert_close(result.output, model(x).detach())


def test_occlusion_windows_cover_the_edges_and_keep_channels_together() -> None:
    model = small_cnn()
    x = torch.rand(2, 2, 6, 6, dtype=DTYPE)
    result = Occlusion(model, window=(4, 4), stride=3, fill=torch.zeros(2, 1, 1, dtype=DTYPE))(x, target=0)
    assert result.relevance.shape == x.shape
    torch.testing.assert_close(result.relevance[:, 0], result.relevance[:, 1])  # a window covers both channels
    # positions 0 and 2 (the edge) in each of the two dimensions: four windows
    corner = x.clone()
    corner[:, :, :4, :4] = 0
    drop = (model(x) - model(corner))[:, 0].detach()
    torch.testing.assert_close(result.relevance[:, 0, 0, 0], drop, **CLOSE)


def test_occlusion_batch_independence() -> None:
    model = small_cnn()
    x = torch.rand(3, 2, 6, 6, dtype=DTYPE)
    full = Occlusion(model, window=(2, 3), batch_size=7)(x, target=[0, 1, 2])
    for index in range(len(x)):
        alone = Occlusion(model, window=(2, 3), batch_size=64)(x[index : index + 1], target=[[0, 1, 2][index]])
        torch.testing.assert_close(alone.relevance[0], full.relevance[index], **CLOSE)


# ---------------------------------------------------------------------------------------------
# shared behaviour: layers, composites, progress, errors, hooks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda model: SmoothGrad(model, composites.EpsilonPlus(), samples=3, seed=0),
        lambda model: SmoothGrad(model, samples=3, seed=0),
        lambda model: IntegratedGradients(model, composites.EpsilonPlus(), steps=4),
        lambda model: IntegratedGradients(model, steps=4),
        lambda model: GradientXInput(model, composites.EpsilonPlus()),
        lambda model: Sensitivity(model),
        lambda model: Occlusion(model, window=(2, 2)),
    ],
    ids=["smoothgrad-lrp", "smoothgrad", "ig-lrp", "ig", "gxi-lrp", "sensitivity", "occlusion"],
)
def test_every_attributor_explains_a_layer_and_cleans_up(make) -> None:
    model = small_cnn()
    x = torch.rand(2, 2, 6, 6, dtype=DTYPE)
    result = make(model)(x, target=1, layer="1")
    assert result.relevance.shape == x.shape
    torch.testing.assert_close(result.output, model[:2](x).detach())
    assert bool(torch.isfinite(result.relevance).all())
    whole = make(model)(x, target=[0, 3])
    assert whole.output.shape == (2, 4)
    assert hooks_left(model) == []


def test_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    model, x = relu_net(), inputs()
    SmoothGrad(model, samples=5, batch_size=4, seed=0, progress=True)(x, target=0)
    err = capsys.readouterr().err
    assert "SmoothGrad [" in err and "5/5 batches" in err and err.endswith("\n")
    IntegratedGradients(model, steps=8, batch_size=4, progress=None)(x, target=0)  # stderr is not a terminal
    Occlusion(model, window=1, batch_size=1, progress=False)(x, target=0)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda m: SmoothGrad(m, noise=-0.1), "noise must be a float >= 0"),
        (lambda m: SmoothGrad(m, samples=0), "samples must be a positive int, got 0"),
        (lambda m: SmoothGrad(m, batch_size=0), "batch_size must be a positive int"),
        (lambda m: IntegratedGradients(m, steps=1), r"method='trapezoid' needs steps >= 2"),
        (lambda m: IntegratedGradients(m, method="simpson"), "method must be one of"),  # type: ignore[arg-type]
        (lambda m: IntegratedGradients(m, baseline="zeros"), "baseline must be None"),  # type: ignore[arg-type]
        (lambda m: Occlusion(m, window=0), "window must be a positive int"),
        (lambda m: Occlusion(m, window=(2, "a")), "window must be"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_are_named(build, pattern) -> None:
    with pytest.raises((ValueError, TypeError), match=pattern):
        build(relu_net())


@pytest.mark.parametrize(
    ("attributor", "pattern"),
    [
        (
            lambda m: IntegratedGradients(m, baseline=torch.zeros(3), steps=2),
            r"baseline has shape \(3,\).*input's shape \(4, 5\)",
        ),
        (lambda m: Occlusion(m, window=(2, 2, 2)), r"window=\(2, 2, 2\) has 3 dimensions.*shape \(4, 5\)"),
        (lambda m: Occlusion(m, window=6), r"window size 6 is larger than the input's size 5"),
        (lambda m: Occlusion(m, window=2, stride=(1, 1)), r"stride=\(1, 1\) must have one step per window"),
        (lambda m: Occlusion(m, window=2, fill=torch.zeros(3)), r"fill has shape \(3,\)"),
        (lambda m: SmoothGrad(m, samples=2), r"got 2 targets for a batch of 4"),
        (lambda m: GradientXInput(m), r"layer='1'.*out of range"),
    ],
)
def test_bad_inputs_name_the_argument_and_shape(attributor, pattern) -> None:
    model, x = relu_net(), inputs()
    target, layer = ([0, 1], None) if "targets" in pattern else (9, "1") if "layer" in pattern else (0, None)
    with pytest.raises(ValueError, match=pattern):
        attributor(model)(x, target=target, layer=layer)
    assert hooks_left(model) == []


@pytest.mark.parametrize(
    "make",
    [
        lambda m: SmoothGrad(m, FunctionalCaptureOnly(), samples=2, seed=0),
        lambda m: IntegratedGradients(m, steps=2),
        lambda m: Occlusion(m, window=2),
        lambda m: Sensitivity(m, FunctionalCaptureOnly()),
    ],
    ids=["smoothgrad", "ig", "occlusion", "sensitivity"],
)
def test_no_hooks_left_after_an_exception_in_the_model(make) -> None:
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), Fails()).to(DTYPE)
    with pytest.raises(RuntimeError, match="boom"):
        make(model)(inputs(), target=0)
    assert hooks_left(model) == []
    result = make(model)(inputs(), target=0, layer="1")
    assert result.output.shape == (4, 3)
    assert hooks_left(model) == []


def FunctionalCaptureOnly() -> composites.Composite:  # noqa: N802 - reads like a preset
    """EpsilonPlus without MergeBatchNorm (whose probe pass runs the whole model once per context)."""
    return composites.EpsilonPlus(canonizers=[FunctionalCapture()])


# -- torch.inference_mode: a clear error where autograd is needed ------------------------------
GRADIENT_ATTRIBUTORS = [Gradient, SmoothGrad, IntegratedGradients]


@pytest.mark.parametrize("attributor", GRADIENT_ATTRIBUTORS, ids=lambda cls: cls.__name__)
def test_inside_inference_mode_the_error_says_so(attributor: type) -> None:
    model = relu_net()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"outside `with torch.inference_mode\(\):`"):
        attributor(model, composite=composites.EpsilonPlus())(inputs(), target=0)
    assert hooks_left(model) == []


def test_an_input_made_under_inference_mode_gets_a_clear_error() -> None:
    with torch.inference_mode():
        x = inputs()
    with pytest.raises(RuntimeError, match=r"made under torch.inference_mode\(\).*x.clone\(\)"):
        Gradient(relu_net(), composite=composites.EpsilonPlus())(x, target=0)


def test_occlusion_needs_no_autograd_and_runs_in_inference_mode() -> None:
    model = relu_net()
    expected = Occlusion(model, window=1)(inputs(), target=0).relevance
    with torch.inference_mode():
        inside = Occlusion(model, window=1)(inputs(), target=0).relevance
    assert torch.equal(inside, expected)


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.linear(x), "hidden": x}


@pytest.mark.parametrize(
    "selector, computes",
    [
        (lambda out: out["logits"], None),
        (lambda out: out["logits"][:, :2].float(), None),
        (lambda out: out["logits"].softmax(1), "SoftmaxBackward0"),
        (lambda out: out["logits"].sum(1, keepdim=True), "SumBackward1"),
    ],
)
def test_selector_that_computes_is_named(selector, computes: str | None) -> None:
    """Arithmetic in ``output=`` runs outside the rules: warned once per call, with LRP only."""
    model, x = DictOutput().eval(), torch.rand(2, 4)
    for attributor in (Gradient(model, composites.EpsilonPlus(), output=selector),
                       SmoothGrad(model, composites.EpsilonPlus(), output=selector, samples=3, batch_size=2)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attributor(x)
        messages = [str(warning.message) for warning in caught]
        assert len(messages) == (computes is not None), messages
        if computes:
            assert computes in messages[0] and "outside the composite's rules" in messages[0]
            assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Gradient(model, output=selector)(x)  # a plain gradient: nothing is missed
