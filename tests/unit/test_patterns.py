"""PatternNet / PatternAttribution: estimators against formulas, rules against hand computations.

Every reference here is computed from the definitions of Kindermans et al. (ICLR 2018) with
numpy in float64 (or with patches cut out of the input by ``Tensor.unfold``), never through
:mod:`lrpkit.patterns` itself.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import hooks_left
from torch import nn

from lrpkit import patterns
from lrpkit.attribution import Gradient
from lrpkit.composites import LayerMapComposite

# -- numpy references ---------------------------------------------------------------------------


def reference_pattern(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, estimator: str) -> np.ndarray:
    """``a_j = cov(x, y_j) / (w_j^T cov(x, y_j))`` per unit, over the active samples for ``positive``."""
    y = x @ weight.T
    z = y if bias is None else y + bias
    pattern = np.zeros_like(weight)
    for unit in range(weight.shape[0]):
        rows = z[:, unit] > 0 if estimator == "positive" else np.ones(len(x), dtype=bool)
        xs, ys = x[rows], y[rows, unit]
        covariance = ((xs - xs.mean(0)) * (ys - ys.mean())[:, None]).mean(0)
        pattern[unit] = covariance / (weight[unit] @ covariance)
    return pattern


def numpy_layer(layer: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    return layer.weight.detach().numpy(), layer.bias.detach().numpy()


# -- a tiny two-layer net with known data --------------------------------------------------------

W1 = [[1.0, -2.0, 0.5], [0.5, 1.0, -1.0], [-1.0, 0.5, 2.0], [2.0, 1.0, 1.0]]
B1 = [0.1, -0.2, 0.3, -0.5]
W2 = [[1.0, -1.0, 0.5, 2.0], [-0.5, 2.0, 1.0, -1.0]]
B2 = [0.2, -0.1]


class Functional(nn.Module):
    """The same net with a functional ReLU (captured by FunctionalCapture if it were active)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def two_layer(style: str) -> tuple[nn.Module, nn.Linear, nn.Linear]:
    if style == "module":
        model: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        first, second = model[0], model[2]
    else:
        model = Functional()
        first, second = model.fc1, model.fc2
    with torch.no_grad():
        for layer, weight, bias in ((first, W1, B1), (second, W2, B2)):
            layer.weight.copy_(torch.tensor(weight))
            layer.bias.copy_(torch.tensor(bias))
    return model.double().eval(), first, second


def known_data() -> np.ndarray:
    return np.random.default_rng(5).normal(size=(40, 3)).round(2)


@pytest.mark.parametrize("style", ["module", "functional"])
@pytest.mark.parametrize("estimator", ["linear", "positive"])
def test_two_layer_patterns_and_relevance_match_hand_computation(style: str, estimator: str) -> None:
    model, first, second = two_layer(style)
    data = known_data()
    (w1, b1), (w2, b2) = numpy_layer(first), numpy_layer(second)
    hidden = np.maximum(data @ w1.T + b1, 0)
    a1 = reference_pattern(data, w1, b1, estimator)
    a2 = reference_pattern(hidden, w2, b2, estimator)

    batches = [torch.tensor(chunk) for chunk in np.split(data, [7, 25])]
    fitted = patterns.fit(model, batches, estimator=estimator)
    names = ["0", "2"] if style == "module" else ["fc1", "fc2"]
    assert list(fitted) == names
    np.testing.assert_allclose(fitted[names[0]].numpy(), a1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fitted[names[1]].numpy(), a2, rtol=1e-10, atol=1e-12)

    x = np.array([0.3, -1.2, 0.8])
    z1 = w1 @ x + b1
    y = w2 @ np.maximum(z1, 0) + b2
    target = 1
    start = np.eye(2)[target] * y[target]
    expected = {
        "attribution": (w1 * a1).T @ (((w2 * a2).T @ start) * (z1 > 0)),
        "net": a1.T @ ((a2.T @ start) * (z1 > 0)),
    }
    assert (z1 > 0).any() and not (z1 > 0).all()  # the ReLU gate matters in this example
    for kind, reference in expected.items():
        result = Gradient(model, patterns.composite(fitted, kind=kind))(torch.tensor(x)[None], target=target)
        np.testing.assert_allclose(result.relevance[0].numpy(), reference, rtol=1e-10, atol=1e-12)


def test_single_unit_patterns_computed_by_hand() -> None:
    """w = (2, -1), x in {(1,0), (0,1), (2,1), (1,3)}: y = 2, -1, 3, -1.

    linear: E[x] = (1, 5/4), E[y] = 3/4, E[xy] = (7/4, -1/4), cov = (1, -19/16),
    w^T cov = 51/16, a = (16/51, -19/51).
    positive (y > 0: the first and third sample): cov+ = (4 - 15/4, 3/2 - 5/4) = (1/4, 1/4),
    w^T cov+ = 1/4, a+ = (1, 1).
    """
    layer = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -1.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    linear = patterns.fit(layer, [x])[""]
    positive = patterns.fit(layer, [x[:1], x[1:]], estimator="positive")[""]
    torch.testing.assert_close(linear, torch.tensor([[16 / 51, -19 / 51]], dtype=torch.float64))
    torch.testing.assert_close(positive, torch.tensor([[1.0, 1.0]], dtype=torch.float64))
    assert float(layer.weight.detach() @ linear[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("estimator", ["linear", "positive"])
def test_estimators_recover_the_signal_direction(estimator: str) -> None:
    """The paper's example: x = a_s s + a_d1 d1 + a_d2 d2, the filter cancels the distractors.

    The distractors are made exactly uncorrelated with the signal in the sample (over all samples
    and over those with s > 0), so the pattern must be a_s itself, while the filter is not.
    """
    rng = np.random.default_rng(0)
    signal_direction = rng.normal(size=5)
    distractor_directions = rng.normal(size=(2, 5))
    # the minimum-norm filter with w^T a_s = 1 and w^T a_d = 0: y = s exactly
    filter_ = np.linalg.pinv(np.vstack([signal_direction, distractor_directions])) @ np.array([1.0, 0.0, 0.0])
    s = rng.normal(size=(2000, 1))
    active = (s > 0).astype(float)
    basis, _ = np.linalg.qr(np.hstack([np.ones_like(s), s, active, s * active]))
    d = rng.normal(size=(2000, 2)) * 3.0
    d -= basis @ (basis.T @ d)
    x = s * signal_direction + d @ distractor_directions
    layer = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(filter_[None]))
    pattern = patterns.fit(layer, torch.tensor(x).split(512), estimator=estimator)[""][0].numpy()

    cosine = filter_ @ signal_direction / np.linalg.norm(filter_) / np.linalg.norm(signal_direction)
    assert cosine < 0.9  # the filter does not point along the signal
    np.testing.assert_allclose(pattern, signal_direction, rtol=1e-9, atol=1e-10)  # the pattern does


# -- convolutions equal dense layers on unfolded patches ------------------------------------------


def unfolded(x: torch.Tensor, conv: nn.modules.conv._ConvNd) -> torch.Tensor:
    """Input windows ``(batch, *positions, channels, *kernel)`` cut out with ``Tensor.unfold``."""
    dims = len(conv.kernel_size)
    pads = [p for pad in reversed(conv.padding) for p in (pad, pad)]
    windows = F.pad(x, pads)
    for axis, (kernel, stride, dilation) in enumerate(zip(conv.kernel_size, conv.stride, conv.dilation)):
        span = (kernel - 1) * dilation + 1
        windows = windows.unfold(2 + axis, span, stride)[..., ::dilation]
    # (batch, channels, *positions, *kernel) -> (batch, *positions, channels, *kernel)
    return windows.movedim(1, 1 + dims)


CONVS = {
    "conv1d": lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1),
    "conv2d": lambda: nn.Conv2d(2, 3, 3, padding=1),
    "conv2d-strided-dilated": lambda: nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(2, 1), dilation=(2, 1)),
    "conv2d-groups": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "conv3d": lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(1, 0, 1), bias=False),
}
SHAPES = {"conv1d": (5, 3, 9), "conv3d": (4, 2, 4, 5, 4)}


@pytest.mark.parametrize("estimator", ["linear", "positive"])
@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_pattern_equals_dense_pattern_on_unfolded_data(kind: str, estimator: str) -> None:
    torch.manual_seed(0)
    conv = CONVS[kind]().double().eval()
    x = torch.randn(SHAPES.get(kind, (5, conv.in_channels, 7, 6)), dtype=torch.float64)
    fitted = patterns.fit(conv, x.split(2), estimator=estimator)[""]

    groups, dims = conv.groups, len(conv.kernel_size)
    windows = unfolded(x, conv)
    per_in, per_out = conv.in_channels // groups, conv.out_channels // groups
    for group in range(groups):
        outputs = slice(group * per_out, (group + 1) * per_out)
        rows = windows[(Ellipsis, slice(group * per_in, (group + 1) * per_in), *[slice(None)] * dims)]
        rows = rows.reshape(-1, per_in * math.prod(conv.kernel_size))
        dense = nn.Linear(rows.shape[1], per_out, bias=conv.bias is not None).double()
        with torch.no_grad():
            dense.weight.copy_(conv.weight[outputs].reshape(per_out, -1))
            if conv.bias is not None:
                dense.bias.copy_(conv.bias[outputs])
        # the patches are right: the dense layer reproduces the convolution
        expected_out = conv(x)[:, outputs].movedim(1, -1).reshape(-1, per_out)
        torch.testing.assert_close(dense(rows), expected_out)
        reference = patterns.fit(dense, [rows], estimator=estimator)[""]
        bias = None if conv.bias is None else dense.bias.detach().numpy()
        formula = reference_pattern(rows.numpy(), dense.weight.detach().numpy(), bias, estimator)
        np.testing.assert_allclose(reference.numpy(), formula, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(fitted[outputs].reshape(per_out, -1), reference, rtol=1e-9, atol=1e-11)


# -- the rules on a convolution -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["attribution", "net"])
def test_rules_on_a_convolution_are_its_transpose_under_the_backward_weight(kind: str) -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    pattern = torch.randn_like(conv.weight)
    rule = patterns.PatternAttribution(pattern) if kind == "attribution" else patterns.PatternNet(pattern)
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    start = torch.randn_like(conv(x))
    result = Gradient(conv, LayerMapComposite([(nn.Conv2d, rule)], canonizers=[]))(x, target=start)

    backward_weight = conv.weight.detach() * pattern if kind == "attribution" else pattern
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(F.conv2d(leaf, backward_weight, stride=2, padding=1), leaf, start)
    torch.testing.assert_close(result.relevance, expected)


def test_rule_casts_the_pattern_to_the_weight() -> None:
    layer = nn.Linear(3, 2)  # float32
    rule = patterns.PatternNet(torch.ones(2, 3, dtype=torch.float64))
    result = Gradient(layer, LayerMapComposite([(nn.Linear, rule)], canonizers=[]))(torch.rand(1, 3), target=0)
    assert result.relevance.dtype == torch.float32
    assert "shape (2, 3)" in repr(rule)


# -- the model is left as it was -----------------------------------------------------------------


def model_with_state() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(12, 2)
    )


def test_fit_leaves_no_hooks_and_the_model_unchanged() -> None:
    model = model_with_state().train()
    before = copy.deepcopy(model.state_dict())
    fitted = patterns.fit(model, [torch.randn(4, 1, 4, 4) for _ in range(3)])
    assert list(fitted) == ["0", "5"]
    assert hooks_left(model) == []
    assert all(module.training for module in model.modules())  # the flags are restored
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_fit_cleans_up_when_the_loader_fails() -> None:
    model = model_with_state().train()
    model[1].eval()
    before = copy.deepcopy(model.state_dict())

    def failing():
        yield torch.randn(2, 1, 4, 4)
        raise KeyError("broken loader")

    with pytest.raises(KeyError, match="broken loader"):
        patterns.fit(model, failing())
    assert hooks_left(model) == []
    assert [module.training for module in model.modules()] == [True, True, False, True, True, True, True]
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_explaining_leaves_no_hooks() -> None:
    model, _, _ = two_layer("module")
    fitted = patterns.fit(model, [torch.randn(8, 3, dtype=torch.float64)])
    Gradient(model, fitted.composite("net"))(torch.randn(2, 3, dtype=torch.float64))
    assert hooks_left(model) == []


# -- loaders, estimator maps, persistence ---------------------------------------------------------


def test_data_loader_of_pairs_equals_tensors_and_progress_is_reported() -> None:
    model, _, _ = two_layer("module")
    x = torch.randn(30, 3, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(30)), batch_size=8)
    seen: list[tuple[int, int]] = []
    from_pairs = patterns.fit(model, loader, estimator="positive", progress=lambda b, s: seen.append((b, s)))
    from_tensors = patterns.fit(model, [x], estimator="positive")
    assert seen == [(1, 8), (2, 16), (3, 24), (4, 30)]
    for name in from_tensors:
        torch.testing.assert_close(from_pairs[name], from_tensors[name])


def test_estimator_per_layer() -> None:
    model, _, _ = two_layer("module")
    x = [torch.randn(20, 3, dtype=torch.float64)]
    mixed = patterns.fit(model, x, estimator={"0": "positive", "2": "linear"})
    assert mixed.estimators == {"0": "positive", "2": "linear"}
    torch.testing.assert_close(mixed["0"], patterns.fit(model, x, "positive", layers=["0"])["0"])
    torch.testing.assert_close(mixed["2"], patterns.fit(model, x, "linear", layers=["2"])["2"])


def test_save_and_load_round_trip(tmp_path) -> None:
    model, _, _ = two_layer("module")
    fitted = patterns.fit(model, [torch.randn(20, 3, dtype=torch.float64)], estimator="positive")
    fitted.save(tmp_path / "patterns.pt")
    loaded = patterns.Patterns.load(tmp_path / "patterns.pt")
    assert list(loaded) == list(fitted) and loaded.estimators == fitted.estimators
    assert all(torch.equal(loaded[name], fitted[name]) for name in fitted)
    torch.save({"weight": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not hold lrpkit patterns"):
        patterns.Patterns.load(tmp_path / "other.pt")


def test_dead_units_get_a_zero_pattern_and_a_warning() -> None:
    layer = nn.Linear(3, 2).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.0, -1e6]))  # unit 1 is never active
    with pytest.warns(patterns.UndefinedPatternWarning, match="layer '': 1 were never active"):
        pattern = patterns.fit(layer, [torch.randn(16, 3, dtype=torch.float64)], estimator="positive")[""]
    assert torch.equal(pattern[1], torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(pattern).all() and pattern[0].abs().sum() > 0


# -- clear errors ----------------------------------------------------------------------------------


def test_pattern_of_the_wrong_shape_names_the_layer() -> None:
    model, _, _ = two_layer("module")
    wrong = patterns.Patterns({"2": torch.ones(4, 2)})
    with pytest.raises(ValueError, match=r"layer '2' \(Linear\) has shape \(4, 2\) but its weight has shape \(2, 4\)"):
        Gradient(model, patterns.composite(wrong))(torch.randn(1, 3, dtype=torch.float64))
    assert hooks_left(model) == []
    rule = patterns.PatternAttribution(torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"module '2' \(Linear\) has shape \(4, 2\)"):
        Gradient(model, LayerMapComposite([(nn.Linear, rule)], canonizers=[]))(torch.randn(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not have"):
        patterns.composite(patterns.Patterns({"9": torch.ones(1)})).register(model)


class Skips(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 2)
        self.unused = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_layers_that_never_ran() -> None:
    data = [torch.randn(4, 3)]
    with pytest.raises(RuntimeError, match=r"\['unused'\] never ran"):
        patterns.fit(Skips(), data, layers=["used", "unused"])
    with pytest.warns(UserWarning, match=r"\['unused'\] never ran"):
        fitted = patterns.fit(Skips(), data)
    assert list(fitted) == ["used"]


def test_bad_arguments() -> None:
    model, _, _ = two_layer("module")
    data = [torch.randn(4, 3, dtype=torch.float64)]
    with pytest.raises(ValueError, match="estimator must be one of"):
        patterns.fit(model, data, estimator="quadratic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="has no layer 'fc'"):
        patterns.fit(model, data, layers=["fc"])
    with pytest.raises(ValueError, match=r"layer '1' \(ReLU\) cannot get a pattern"):
        patterns.fit(model, data, layers=["1"])
    with pytest.raises(TypeError, match="sequence of names"):
        patterns.fit(model, data, layers="0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="yielded no batch"):
        patterns.fit(model, [])
    with pytest.raises(TypeError, match="a batch must be a tensor"):
        patterns.fit(model, [{"x": data[0]}])
    with pytest.raises(ValueError, match="no nn.Linear or convolution"):
        patterns.fit(nn.ReLU(), data)
    with pytest.raises(ValueError, match="kind must be one of"):
        patterns.composite(patterns.fit(model, data), kind="gradient")  # type: ignore[arg-type]
    with pytest.warns(UserWarning, match=r"no pattern for '1' \(ConvTranspose1d\)"):
        patterns.fit(nn.Sequential(nn.Conv1d(1, 2, 2), nn.ConvTranspose1d(2, 1, 2)), [torch.randn(2, 1, 5)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_and_explain_on_cuda_match_the_cpu() -> None:
    model, _, _ = two_layer("module")
    x = torch.randn(64, 3, dtype=torch.float64)
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, groups=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2)).double()
    images = torch.randn(6, 2, 7, 7, dtype=torch.float64)
    for net, data in ((model, x), (conv, images)):
        on_cpu = patterns.fit(net, data.split(16), estimator="positive")
        on_gpu = patterns.fit(net.cuda(), data.split(16), estimator="positive")
        for name in on_cpu:
            assert on_gpu[name].device.type == "cpu"
            torch.testing.assert_close(on_gpu[name], on_cpu[name])
        relevance = Gradient(net, patterns.composite(on_gpu))(data[:2].cuda(), target=0).relevance
        net.cpu()
        expected = Gradient(net, patterns.composite(on_cpu))(data[:2], target=0).relevance
        torch.testing.assert_close(relevance.cpu(), expected)
