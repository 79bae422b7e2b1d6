"""lrpkit.evaluation: conservation report, region perturbation (AOPC, ABPC), randomisation check."""

from __future__ import annotations

import copy
import inspect
import io
from collections import OrderedDict

import pytest
import torch
from torch import Tensor, nn

import lrpkit
from lrpkit import composites
from lrpkit.attribution import Attribution, Gradient
from lrpkit.progress import Progress
from lrpkit.evaluation import (
    ConservationReport,
    PerturbationCurve,
    abpc,
    aopc,
    conservation,
    perturbation_curve,
    randomisation_check,
    spearman,
    ssim_lite,
)

# ================================================================================ helpers


def linear_model(weights: list[float], shape: tuple[int, ...] = (1, 2, 2)) -> nn.Module:
    """``score = x . w``: a bias-free linear read-out of the flattened input, one class."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(len(weights), 1, bias=False)).double().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([weights], dtype=torch.float64))
    return model


def gradient_times_input(model: nn.Module, x: Tensor) -> Tensor:
    """The exact contribution of each pixel to a linear model's score."""
    return x * model[1].weight.view(1, *x.shape[1:])


def small_cnn(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(2, 4, 3, padding=1),
                relu=nn.ReLU(),
                pool=nn.AvgPool2d(2),
                flatten=nn.Flatten(),
                fc=nn.Linear(4 * 3 * 3, 5),
            )
        ).double().eval()


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_bitwise_equal(model: nn.Module, before: dict[str, Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and torch.equal(after[name], value), name


# ================================================================================ conservation


def hand_built() -> Attribution:
    return Attribution(
        output=torch.tensor([[4.0, 1.0], [2.0, 3.0]]),
        relevance=torch.tensor([[[3.0, 1.0]], [[1.0, 1.5]]]),
        intermediate={"first": torch.tensor([[4.0, 0.0], [3.0, 0.0]]), "second": torch.tensor([[2.0, 2.0], [2.0, 1.0]])},
        start=torch.tensor([[4.0, 0.0], [0.0, 3.0]]),
    )


def test_conservation_rows_sums_and_ratios() -> None:
    report = conservation(hand_built())
    assert isinstance(report, ConservationReport)
    # from the output down to the input: the recorded layers in reverse forward order
    assert report.names == ["(output)", "second", "first", "(input)"]
    assert torch.equal(report.start, torch.tensor([4.0, 3.0], dtype=torch.float64))
    assert torch.equal(report["second"].sums, torch.tensor([4.0, 3.0], dtype=torch.float64))
    assert torch.equal(report["first"].ratio, torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert torch.equal(report["(input)"].sums, torch.tensor([4.0, 2.5], dtype=torch.float64))
    assert torch.allclose(report["(input)"].ratio, torch.tensor([1.0, 2.5 / 3], dtype=torch.float64))
    assert report.max_deviation == pytest.approx(0.5 / 3)
    assert len(report) == 4 and [row.name for row in report] == report.names
    with pytest.raises(KeyError, match="rows: \\(output\\), second"):
        report["missing"]


def test_conservation_without_intermediate_has_start_and_input() -> None:
    result = Attribution(output=torch.ones(1, 3), relevance=torch.full((1, 4), 0.5), start=torch.tensor([[0.0, 2.0, 0.0]]))
    report = conservation(result)
    assert report.names == ["(output)", "(input)"]
    assert report.max_deviation == 0.0


def test_conservation_sums_a_sequence_of_tensors_for_multi_input_modules() -> None:
    result = hand_built()
    result.intermediate = {"add": (torch.tensor([[1.0], [1.0]]), torch.tensor([[3.0], [2.0]]))}
    assert torch.equal(conservation(result)["add"].sums, torch.tensor([4.0, 3.0], dtype=torch.float64))


def test_conservation_table_is_aligned() -> None:
    text = str(conservation(hand_built()))
    lines = text.splitlines()
    assert lines[0].startswith("relevance conservation, 2 samples")
    table = lines[1:-1]
    assert [line.split()[0] for line in table] == ["layer", "(output)", "second", "first", "(input)"]
    # right-aligned numeric columns: every row ends at the same column
    assert len({len(line) for line in table}) == 1
    assert "0.833333" in text and lines[-1] == "max |ratio - 1|: 0.167"


def test_conservation_table_shows_at_most_four_samples() -> None:
    result = Attribution(output=torch.ones(6, 2), relevance=torch.ones(6, 2), start=torch.full((6, 2), 1.0))
    text = str(conservation(result))
    assert "first 4 shown" in text and "sum[3]" in text and "sum[4]" not in text


def test_conservation_zero_start_gives_non_finite_ratio() -> None:
    result = Attribution(output=torch.zeros(1, 2), relevance=torch.ones(1, 2), start=torch.zeros(1, 2))
    assert torch.isinf(conservation(result)["(input)"].ratio).all()


def test_conservation_errors_name_the_entry() -> None:
    with pytest.raises(ValueError, match="result.start is None"):
        conservation(Attribution(output=torch.ones(1, 2), relevance=torch.ones(1, 2)))
    result = hand_built()
    result.intermediate["bad"] = torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"result.intermediate\['bad'\] has shape \(3, 2\), batch size 3.*batch size 2"):
        conservation(result)
    result.intermediate = {"odd": "text"}  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"result.intermediate\['odd'\] must be a tensor"):
        conservation(result)


def bias_free_mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double().eval()


def test_conservation_of_a_real_run_without_record() -> None:
    model = bias_free_mlp()
    x = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = Gradient(model, composite=composites.EpsilonPlus())(x, target=1)
    report = conservation(result)
    assert report.names == ["(output)", "(input)"]
    assert torch.allclose(report.start, result.output[:, 1].double())
    assert report.max_deviation < 1e-4  # only the epsilon (1e-6) absorbs relevance: no biases


def _record_parameter() -> inspect.Parameter | None:
    return inspect.signature(Gradient.__call__).parameters.get("record")


class Residual(nn.Module):
    """``flatten(x + relu(conv(x)))``: a captured addition with two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(x + torch.relu(self.conv(x)), 1)


@pytest.mark.skipif(_record_parameter() is None, reason="Gradient.__call__ has no `record` parameter yet")
def test_conservation_of_a_real_run_with_record() -> None:
    model = bias_free_mlp()
    x = torch.rand(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = Gradient(model, composite=composites.EpsilonPlus())(x, target=1, record=True)
    report = conservation(result)
    assert report.names == ["(output)", "2", "1", "0", "(input)"]
    assert report.max_deviation < 1e-4

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        residual = nn.Sequential(Residual(), nn.Linear(32, 3, bias=False)).double().eval()
    images = torch.rand(2, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = Gradient(residual, composite=composites.EpsilonPlus())(images, target=0, record=True)
    assert {"0.add[0]", "0.add[1]"} <= set(result.intermediate)
    report = conservation(result)
    assert "0.add" in report.names and "0.add[0]" not in report.names
    assert torch.allclose(report["0.add"].ratio, torch.ones(2, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(report["(input)"].ratio, torch.ones(2, dtype=torch.float64), atol=1e-4)
    branch = report["0.conv"].ratio  # one branch of the block: its share only
    assert bool((branch < 0.9).all())
    separate = conservation(result, merge_inputs=False)
    assert {"0.add[0]", "0.add[1]"} <= set(separate.names)
    assert torch.allclose(separate["0.add[0]"].sums + separate["0.add[1]"].sums, report["0.add"].sums)


def test_merge_inputs_on_hand_built_entries() -> None:
    result = hand_built()
    result.intermediate = {"block.add[0]": torch.tensor([[1.0], [2.0]]), "block.add[1]": torch.tensor([[3.0], [1.0]]),
                           "head": torch.tensor([[4.0], [3.0]])}
    report = conservation(result)
    assert report.names == ["(output)", "head", "block.add", "(input)"]
    assert torch.equal(report["block.add"].ratio, torch.ones(2, dtype=torch.float64))
    assert conservation(result, merge_inputs=False).names == ["(output)", "head", "block.add[1]", "block.add[0]", "(input)"]


# ========================================================================= region perturbation

WEIGHTS = [1.0, 4.0, 2.0, 3.0]  # pixel (0,0)=1, (0,1)=4, (1,0)=2, (1,1)=3


def test_morf_removes_the_most_relevant_pixel_first() -> None:
    model = linear_model(WEIGHTS)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    curve = perturbation_curve(model, x, gradient_times_input(model, x), target=0, fill="zero")
    assert isinstance(curve, PerturbationCurve)
    assert curve.scores.tolist() == [[10.0, 6.0, 3.0, 1.0, 0.0]]  # removes 4, 3, 2, 1
    assert curve.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.order == "morf" and curve.region == (1, 1) and curve.n_regions == 4 and curve.steps == 4
    assert curve.targets.tolist() == [0]


def test_lerf_removes_the_least_relevant_pixel_first() -> None:
    model = linear_model(WEIGHTS)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    curve = perturbation_curve(model, x, gradient_times_input(model, x), target=0, order="lerf", fill="zero")
    assert curve.scores.tolist() == [[10.0, 9.0, 7.0, 4.0, 0.0]]  # removes 1, 2, 3, 4


def test_fill_value_replaces_every_channel_and_relevance_is_summed_over_channels() -> None:
    # two channels; channel sums of the relevance rank the pixels 2 > 0 > 3 > 1
    model = linear_model([1.0] * 8, shape=(2, 2, 2))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]], dtype=torch.float64)
    relevance = torch.tensor([[[[5.0, -1.0], [2.0, 0.0]], [[0.0, 0.5], [4.0, 1.0]]]], dtype=torch.float64)
    curve = perturbation_curve(model, x, relevance, target=0, fill=0.5)
    pixel_totals = [1 + 5, 2 + 6, 3 + 7, 4 + 8]
    expected, score = [36.0], 36.0
    for pixel in (2, 0, 3, 1):
        score = score - pixel_totals[pixel] + 2 * 0.5
        expected.append(score)
    assert curve.scores.tolist() == [expected]


def test_regions_rank_by_summed_relevance_with_partial_edge_regions() -> None:
    # a 3x3 input cut into 2x2 regions: [0:2,0:2], [0:2,2], [2,0:2], [2,2] (row-major)
    model = linear_model([1.0] * 9, shape=(1, 3, 3))
    x = torch.arange(1.0, 10.0, dtype=torch.float64).view(1, 1, 3, 3)
    relevance = torch.zeros_like(x)
    relevance[0, 0, 2, 2] = 10.0  # region 3 first
    relevance[0, 0, 0, 2] = 3.0  # region 1 (pixels 3 and 6) second
    relevance[0, 0, 2, 0] = 2.0  # region 2 (pixels 7 and 8) third, then region 0
    curve = perturbation_curve(model, x, relevance, target=0, region=2, fill="zero")
    assert curve.n_regions == 4 and curve.region == (2, 2)
    assert curve.scores.tolist() == [[45.0, 36.0, 27.0, 12.0, 0.0]]
    rectangular = perturbation_curve(model, x, relevance, target=0, region=(3, 1), fill="zero")
    assert rectangular.n_regions == 3  # columns
    assert rectangular.scores.tolist() == [[45.0, 27.0, 15.0, 0.0]]  # column 2, then 0, then 1


def test_ties_are_broken_by_region_index_in_both_orders() -> None:
    model = linear_model(WEIGHTS)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    flat = torch.zeros_like(x)
    for order in ("morf", "lerf"):
        curve = perturbation_curve(model, x, flat, target=0, order=order, fill="zero")
        assert curve.scores.tolist() == [[10.0, 9.0, 5.0, 3.0, 0.0]]  # pixel 0, 1, 2, 3


def test_steps_and_max_fraction() -> None:
    model = linear_model([1.0] * 16, shape=(1, 4, 4))
    x = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    relevance = torch.arange(16.0, dtype=torch.float64).view(1, 1, 4, 4)
    curve = perturbation_curve(model, x, relevance, target=0, steps=4, fill="zero")
    assert curve.fractions.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.scores.tolist() == [[16.0, 12.0, 8.0, 4.0, 0.0]]
    partial = perturbation_curve(model, x, relevance, target=0, max_fraction=0.25, fill="zero")
    assert partial.steps == 4 and partial.scores.tolist() == [[16.0, 15.0, 14.0, 13.0, 12.0]]
    uneven = perturbation_curve(model, x, relevance, target=0, steps=3, max_fraction=0.5, fill="zero")
    assert uneven.fractions.tolist() == [0.0, 3 / 16, 5 / 16, 0.5]  # 0, 3, 5, 8 regions (rounded)
    with pytest.raises(ValueError, match="steps=9 is more than the 8 regions"):
        perturbation_curve(model, x, relevance, target=0, steps=9, max_fraction=0.5)
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="max_fraction must lie in"):
            perturbation_curve(model, x, relevance, target=0, max_fraction=fraction)


def test_fill_mean_is_per_sample_and_channel() -> None:
    model = linear_model([1.0] * 8, shape=(2, 2, 2))
    x = torch.tensor([[[[0.0, 0.0], [0.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]]], dtype=torch.float64)
    curve = perturbation_curve(model, x, torch.ones_like(x), target=0)  # ties: pixel order 0..3
    # channel means 1 and 1: every removed pixel becomes 1 + 1
    assert curve.scores.tolist() == [[8.0, 9.0, 10.0, 11.0, 8.0]]


def test_fill_uniform_is_seeded_and_within_each_samples_range() -> None:
    model = linear_model([1.0] * 4)
    x = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]], [[[10.0, 10.0], [10.0, 12.0]]]], dtype=torch.float64)
    relevance = torch.rand(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def run(seed: int) -> PerturbationCurve:
        return perturbation_curve(model, x, relevance, target=0, fill="uniform", generator=torch.Generator().manual_seed(seed))

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first.scores, again.scores) and not torch.equal(first.scores, other.scores)
    # everything replaced: the score is the sum of four values drawn in [min, max] of the sample
    assert 0.0 <= first.scores[0, -1] <= 12.0 and 40.0 <= first.scores[1, -1] <= 48.0


def test_fill_tensor_baseline() -> None:
    model = linear_model(WEIGHTS)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    baseline = torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float64)  # broadcast over batch/channel
    curve = perturbation_curve(model, x, gradient_times_input(model, x), target=0, fill=baseline)
    # pixels in MoRF order 1, 3, 2, 0 take the values 1, 3, 2, 0: + 0, + 3 * 2, + 2 * 1, - 1 * 1
    assert curve.scores.tolist() == [[10.0, 10.0, 16.0, 18.0, 17.0]]
    with pytest.raises(ValueError, match=r"tensor fill of shape \(3,\) does not broadcast"):
        perturbation_curve(model, x, x, target=0, fill=torch.zeros(3))


def test_target_none_is_the_prediction_on_the_unperturbed_input() -> None:
    model = small_cnn()
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    relevance = Gradient(model)(x).relevance
    curve = perturbation_curve(model, x, relevance)
    predicted = model(x).argmax(1)
    assert torch.equal(curve.targets, predicted)
    assert torch.allclose(curve.scores[:, 0], model(x).gather(1, predicted[:, None])[:, 0].detach())
    listed = perturbation_curve(model, x, relevance, target=[0, 1, 2, 3])
    assert listed.targets.tolist() == [0, 1, 2, 3]


def test_batch_size_does_not_change_the_result() -> None:
    model = small_cnn()
    x = torch.rand(5, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    relevance = Gradient(model, composite=composites.EpsilonPlusFlat())(x).relevance
    for fill in ("mean", "uniform"):
        curves = [
            perturbation_curve(model, x, relevance, region=(2, 3), fill=fill, batch_size=size,
                               generator=torch.Generator().manual_seed(0))
            for size in (1, 7, 1000)
        ]
        for curve in curves[1:]:
            assert torch.allclose(curve.scores, curves[0].scores, rtol=1e-12, atol=1e-12)
            assert torch.equal(curve.targets, curves[0].targets)


def test_inputs_and_model_are_not_modified() -> None:
    model = small_cnn()
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    relevance = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_before, relevance_before, state_before = x.clone(), relevance.clone(), snapshot(model)
    perturbation_curve(model, x, relevance, fill="uniform", batch_size=4)
    abpc(model, x, relevance, region=2, fill=0.0)
    assert torch.equal(x, x_before) and torch.equal(relevance, relevance_before)
    assert_bitwise_equal(model, state_before)
    assert not model.training and all(parameter.grad is None for parameter in model.parameters())


def test_features_input_and_dict_output() -> None:
    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2, bias=False).double()
            with torch.no_grad():
                self.linear.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"logits": self.linear(x)}

    model = DictModel()
    x = torch.ones(1, 3, dtype=torch.float64)
    curve = perturbation_curve(model, x, torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), target=0,
                               fill="zero", output="logits")
    assert curve.scores.tolist() == [[6.0, 3.0, 1.0, 0.0]]


def test_perturbation_errors_are_clear() -> None:
    model = linear_model(WEIGHTS)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"relevance has shape \(1, 4\) but x has shape \(1, 1, 2, 2\)"):
        perturbation_curve(model, x, torch.ones(1, 4), target=0)
    with pytest.raises(ValueError, match="NaN"):
        perturbation_curve(model, x, torch.full_like(x, float("nan")), target=0)
    with pytest.raises(ValueError, match="order must be 'morf'"):
        perturbation_curve(model, x, x, target=0, order="random")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"region=\(1, 1, 1\) does not fit .* spatial shape \(2, 2\)"):
        perturbation_curve(model, x, x, target=0, region=(1, 1, 1))
    with pytest.raises(ValueError, match="larger than the input"):
        perturbation_curve(model, x, x, target=0, region=3)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        perturbation_curve(model, x, x, target=0, batch_size=0)
    with pytest.raises(ValueError, match="out of range for an output with 1 classes"):
        perturbation_curve(model, x, x, target=1)
    with pytest.raises(ValueError, match="fill must be"):
        perturbation_curve(model, x, x, target=0, fill="blur")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch dimension"):
        perturbation_curve(model, torch.ones(4), torch.ones(4), target=0)
    with pytest.raises(TypeError, match="floating-point"):
        perturbation_curve(model, x.long(), x.long(), target=0)  # token ids may be x, not relevance
    with pytest.raises(TypeError, match="floating-point"):
        perturbation_curve(model, x.bool(), x, target=0)


def test_progress_bar_only_when_asked() -> None:
    stream = io.StringIO()
    with Progress("perturbation", 3, True, stream=stream) as bar:
        for _ in range(3):
            bar.step()
    assert stream.getvalue().endswith("\rlrpkit perturbation [########################] 3/3\n")
    quiet = io.StringIO()
    with Progress("perturbation", 3, None, stream=quiet, delay=0.0) as bar:  # not a terminal
        bar.step()
    assert quiet.getvalue() == ""


def test_progress_false_writes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    model = linear_model(WEIGHTS)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    perturbation_curve(model, x, x, target=0, progress=False)
    assert capsys.readouterr().err == ""
    perturbation_curve(model, x, x, target=0, progress=True, batch_size=2)
    assert "lrpkit perturbation [" in capsys.readouterr().err


# ================================================================================ AOPC / ABPC


def known_curve(scores: list[list[float]]) -> PerturbationCurve:
    steps = len(scores[0]) - 1
    return PerturbationCurve(
        fractions=torch.linspace(0, 1, steps + 1, dtype=torch.float64),
        scores=torch.tensor(scores),
        targets=torch.zeros(len(scores), dtype=torch.long),
        order="morf",
        region=(1, 1),
        n_regions=steps,
    )


def test_aopc_of_a_known_curve() -> None:
    curve = known_curve([[5.0, 3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 2.0, 1.0, 1.0]])
    # (0 + 2 + 3 + 4 + 5) / 5 = 2.8 and (0 + 0 - 1 + 0 + 0) / 5 = -0.2
    assert torch.allclose(aopc(curve, reduction="none"), torch.tensor([2.8, -0.2]))
    assert torch.allclose(aopc(curve), torch.tensor(1.3))
    assert torch.equal(curve.mean, torch.tensor([3.0, 2.0, 2.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none'"):
        aopc(curve, reduction="sum")  # type: ignore[arg-type]


def test_aopc_of_the_linear_model() -> None:
    model = linear_model(WEIGHTS)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    curve = perturbation_curve(model, x, gradient_times_input(model, x), target=0, fill="zero")
    assert float(aopc(curve)) == pytest.approx((0 + 4 + 7 + 9 + 10) / 5)


def test_abpc_is_the_area_between_lerf_and_morf() -> None:
    model = linear_model(WEIGHTS)
    x = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    relevance = gradient_times_input(model, x)
    # LeRF 10 9 7 4 0, MoRF 10 6 3 1 0
    assert float(abpc(model, x, relevance, target=0, fill="zero")) == pytest.approx((0 + 3 + 4 + 3 + 0) / 5)
    assert float(abpc(model, x, -relevance, target=0, fill="zero")) == pytest.approx(-2.0)

    cnn = small_cnn()
    images = torch.rand(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    heatmaps = Gradient(cnn, composite=composites.EpsilonPlusFlat())(images).relevance
    options = dict(region=2, fill="uniform")
    per_sample = abpc(cnn, images, heatmaps, reduction="none", generator=torch.Generator().manual_seed(5), **options)
    # the same noise for both curves: the definition from the two curves with one baseline
    noise = torch.Generator().manual_seed(5)
    low = images.flatten(1).min(1).values.view(-1, 1, 1, 1)
    high = images.flatten(1).max(1).values.view(-1, 1, 1, 1)
    baseline = low + torch.rand(images.shape, generator=noise, dtype=images.dtype) * (high - low)
    morf = perturbation_curve(cnn, images, heatmaps, region=2, fill=baseline)
    lerf = perturbation_curve(cnn, images, heatmaps, order="lerf", region=2, fill=baseline)
    assert torch.allclose(per_sample, (lerf.scores - morf.scores).mean(1), rtol=1e-12)


# ================================================================================ randomisation


class Shuffled(nn.Module):
    """Registration order differs from execution order: ``late`` is registered first, runs last."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(6, 3)
        self.early = nn.Linear(4, 6)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.late(self.act(self.early(x)))


def lrp_factory(model: nn.Module) -> Gradient:
    return Gradient(model, composite=composites.EpsilonPlus())


def test_randomisation_leaves_the_users_model_untouched() -> None:
    model = small_cnn()
    before = snapshot(model)
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = randomisation_check(model, x, lrp_factory, generator=torch.Generator().manual_seed(0))
    assert_bitwise_equal(model, before)
    assert not any(len(module._forward_hooks) or len(module._forward_pre_hooks) for module in model.modules())
    assert result.layers == ("fc", "conv")
    assert result.similarity.shape == (2, 3) and result.randomised.shape == (2, *x.shape)
    assert torch.equal(result.original, lrp_factory(model)(x).relevance)


def test_top_down_follows_execution_order_not_registration_order() -> None:
    model = Shuffled().double()
    x = torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = randomisation_check(model, x, lrp_factory, generator=torch.Generator().manual_seed(0))
    assert result.layers == ("late", "early")


class Functional(nn.Module):
    """A root parameter and a child whose weights are used without calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, 4))
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(nn.functional.linear(x * self.scale, self.proj.weight, self.proj.bias))


def test_parameters_of_modules_that_never_run_go_with_the_module_that_uses_them() -> None:
    model = Functional().double()
    seen: list[nn.Module] = []

    def keep(m: nn.Module) -> Gradient:
        seen.append(copy.deepcopy(m))
        return Gradient(m)

    x = torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = randomisation_check(model, x, keep, generator=torch.Generator().manual_seed(0))
    assert result.layers == ("head", "")
    original, _, everything = seen
    for name, parameter in original.named_parameters():
        assert not torch.equal(everything.get_parameter(name), parameter), name


def test_a_model_independent_explanation_stays_identical() -> None:
    model = small_cnn()
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def edge_detector(model: nn.Module, x: Tensor, target: object = None) -> Tensor:
        return x.diff(dim=-1, prepend=x[..., :1])

    for similarity in ("spearman", "ssim-lite"):
        result = randomisation_check(model, x, edge_detector, similarity=similarity)
        assert torch.allclose(result.similarity, torch.ones(2, 3, dtype=torch.float64))


def test_randomised_parameters_keep_the_scale_and_change() -> None:
    model = small_cnn()
    seen: list[nn.Module] = []

    def keep(m: nn.Module) -> Gradient:
        seen.append(copy.deepcopy(m))
        return Gradient(m)

    x = torch.rand(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    randomisation_check(model, x, keep, generator=torch.Generator().manual_seed(0))
    original, fc_random, all_random = seen
    assert torch.equal(fc_random.conv.weight, original.conv.weight)  # cascade: conv still trained
    assert not torch.equal(fc_random.fc.weight, original.fc.weight)
    assert torch.equal(all_random.fc.weight, fc_random.fc.weight)  # and fc stays randomised
    assert not torch.equal(all_random.conv.weight, original.conv.weight)
    for name in ("conv.weight", "fc.weight"):
        trained, random = original.get_parameter(name), all_random.get_parameter(name)
        assert random.std().item() == pytest.approx(trained.std().item(), rel=0.3)


def test_randomisation_is_seeded() -> None:
    model = small_cnn()
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    runs = [randomisation_check(model, x, lrp_factory, generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert torch.equal(runs[0].similarity, runs[1].similarity)
    assert torch.equal(runs[0].randomised, runs[1].randomised)
    assert not torch.equal(runs[0].randomised, runs[2].randomised)


def test_layer_list_explain_function_and_independent_mode() -> None:
    model = small_cnn()
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cascade = randomisation_check(model, x, lrpkit.explain, layers=["conv", "fc"],
                                  generator=torch.Generator().manual_seed(0))
    assert cascade.layers == ("conv", "fc") and cascade.cascade
    single = randomisation_check(model, x, lrpkit.explain, layers=["conv", "fc"], cascade=False,
                                 generator=torch.Generator().manual_seed(0))
    assert not single.cascade
    assert torch.equal(single.similarity[0], cascade.similarity[0])  # same first step, same draw
    whole = randomisation_check(nn.Sequential(OrderedDict(body=small_cnn())), x, Gradient, layers=["body"])
    assert whole.layers == ("body",)  # a container: every parameter below it
    assert "randomised up to" in str(cascade) and "one layer at a time" in str(single)


def test_target_none_is_fixed_to_the_trained_prediction() -> None:
    model = small_cnn()
    x = torch.rand(3, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets: list[object] = []

    def explain(model: nn.Module, x: Tensor, target: object = None) -> Attribution:
        targets.append(target)
        return Gradient(model)(x, target=target)

    randomisation_check(model, x, explain, generator=torch.Generator().manual_seed(0))
    assert targets[0] is None
    predicted = model(x).argmax(1)
    assert all(torch.equal(target, predicted) for target in targets[1:])  # type: ignore[arg-type]
    given: list[object] = []
    randomisation_check(model, x, lambda m, x, target: given.append(target) or Gradient(m)(x, target=target), target=2)
    assert given == [2, 2, 2]


def test_custom_similarity_and_errors() -> None:
    model = small_cnn()
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = randomisation_check(model, x, Gradient, similarity=lambda a, b: (a - b).flatten(1).norm(dim=1))
    assert result.similarity.shape == (2, 2) and bool((result.similarity > 0).all())
    with pytest.raises(TypeError, match=r"shape \(2,\)"):
        randomisation_check(model, x, Gradient, similarity=lambda a, b: torch.zeros(3))
    with pytest.raises(ValueError, match="similarity must be"):
        randomisation_check(model, x, Gradient, similarity="pearson")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no module 'head'; modules with parameters: conv, fc"):
        randomisation_check(model, x, Gradient, layers=["head"])
    with pytest.raises(ValueError, match="'relu' has no parameters"):
        randomisation_check(model, x, Gradient, layers=["relu"])
    with pytest.raises(ValueError, match="layers is empty"):
        randomisation_check(model, x, Gradient, layers=[])
    with pytest.raises(TypeError, match="no required positional argument"):
        randomisation_check(model, x, lambda: None)
    with pytest.raises(ValueError, match=r"has shape \(2, 3\) but x has shape"):
        randomisation_check(model, x, lambda m, x, target=None: torch.zeros(2, 3))


# ================================================================================ similarities


def test_spearman_matches_the_definition_with_ties() -> None:
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 1.0, 4.0, 4.0, 6.0], [3.0, 2.0, 1.0, 0.0, 0.0]])
    # average ranks (0-based): a0 = 0 1.5 1.5 3 4, b0 = 1 0 2.5 2.5 4; a1 = 1 1 1 3.5 3.5, b1 = 4 3 2 0.5 0.5
    def pearson(u: list[float], v: list[float]) -> float:
        tu, tv = torch.tensor(u, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)
        tu, tv = tu - tu.mean(), tv - tv.mean()
        return float((tu * tv).sum() / (tu.norm() * tv.norm()))

    expected = [pearson([0, 1.5, 1.5, 3, 4], [1, 0, 2.5, 2.5, 4]), pearson([1, 1, 1, 3.5, 3.5], [4, 3, 2, 0.5, 0.5])]
    assert torch.allclose(spearman(a, b), torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(spearman(a, a), torch.ones(2, dtype=torch.float64))
    assert torch.isnan(spearman(torch.ones(1, 4), torch.rand(1, 4))).all()
    with pytest.raises(ValueError, match="same shape"):
        spearman(torch.ones(2, 3), torch.ones(2, 4))


def test_spearman_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 3, 5, 5), generator=generator).double()  # many ties
    b = a + torch.randint(0, 3, a.shape, generator=generator).double()
    expected = [stats.spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy())[0] for i in range(4)]
    assert torch.allclose(spearman(a, b), torch.tensor(expected, dtype=torch.float64), rtol=1e-10)


def test_ssim_lite() -> None:
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 2, 8, 8, generator=generator, dtype=torch.float64)
    assert torch.allclose(ssim_lite(image, image), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(ssim_lite(image, 3 * image + 1), torch.ones(3, dtype=torch.float64))  # min-max scaled
    noise = torch.rand(image.shape, generator=generator, dtype=torch.float64)
    assert torch.allclose(ssim_lite(image, noise), ssim_lite(noise, image))
    assert bool((ssim_lite(image, noise) < 0.3).all())
    flat = torch.rand(3, 10, generator=generator, dtype=torch.float64)
    assert torch.allclose(ssim_lite(flat, flat), torch.ones(3, dtype=torch.float64))
    assert ssim_lite(image, noise, window=3).shape == (3,)
    with pytest.raises(ValueError, match="same shape"):
        ssim_lite(image, flat)


def test_plot_curves_draws_one_line_per_curve_and_saves(tmp_path):
    pytest.importorskip("matplotlib")
    from lrpkit.evaluation import perturbation_curve, plot_curves

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    x = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    curves = {order: perturbation_curve(model, x, x, target=0, order=order) for order in ("morf", "lerf")}
    figure = plot_curves(curves, path=tmp_path / "curves.png", title="pixel flipping")
    (axes,) = figure.axes
    assert [line.get_label() for line in axes.get_lines()] == ["morf", "lerf"]
    assert list(axes.get_lines()[0].get_ydata()) == pytest.approx(curves["morf"].mean.tolist())
    assert (tmp_path / "curves.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at least one curve"):
        plot_curves({})


class _BagOfWords(nn.Module):
    """A linear model of token ids: the score of a sentence is the sum of its words' weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(6, 1)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.tensor([[0.0], [1.0], [4.0], [2.0], [3.0], [-1.0]]))

    def forward(self, ids: Tensor) -> Tensor:
        words = self.embedding(ids).squeeze(-1)
        return torch.stack([words.sum(1), -words.sum(1)], dim=1)


def test_word_deletion_on_token_ids() -> None:
    """Token ids are perturbed as regions of one token each, replaced by the id ``fill``."""
    model, ids = _BagOfWords().eval(), torch.tensor([[1, 2, 3, 4]])
    relevance = Gradient(model, composites.EpsilonPlus())(ids, target=0).relevance
    curve = perturbation_curve(model, ids, relevance, target=0, fill=0)
    assert curve.scores.tolist() == [[10.0, 6.0, 3.0, 1.0, 0.0]]  # words 4, 3, 2, 1 deleted in turn
    lerf = perturbation_curve(model, ids, relevance, target=0, fill=torch.tensor(5), order="lerf")
    assert lerf.scores.tolist() == [[10.0, 8.0, 5.0, 1.0, -4.0]]  # replaced by the word of weight -1
    with pytest.raises(ValueError, match="x holds token ids"):
        perturbation_curve(model, ids, relevance, target=0)  # the default fill "mean" is no id


def test_randomisation_check_on_token_ids() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    ids = torch.randint(0, 10, (2, 3), generator=torch.Generator().manual_seed(1))
    check = randomisation_check(model, ids, lambda m: Gradient(m, composites.EpsilonPlus()), generator=torch.Generator().manual_seed(0))
    assert check.layers == ("4", "2", "0") and check.similarity.shape == (3, 2)  # (layers, samples)


def test_randomisation_progress_counts_explanations(capsys: pytest.CaptureFixture[str]) -> None:
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    randomisation_check(small_cnn(), x, lrp_factory, progress=True)
    assert capsys.readouterr().err.endswith("] 3/3 explanations\n")  # the trained model, then fc and conv
    randomisation_check(small_cnn(), x, lrp_factory, progress=False)
    assert capsys.readouterr().err == ""
