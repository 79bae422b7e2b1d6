"""lrpkit's rules against the independent matrix-form reference in ``tests/reference.py``.

Every rule is applied to a one-layer model through the public API
(``LayerMapComposite`` + ``Gradient`` with a tensor target = the relevance arriving at the
layer output) and compared in float64 with the reference; acceptance is a relative error
``max|ours - ref| / max|ref| <= 1e-10``.

Random data is redrawn (next seed) until every denominator that is not a sign-definite sum
satisfies ``|den| >= MIN_CONDITIONING * sum|terms|``, so that rounding differences of two
correct implementations (about 1e-16 * sum|terms|) cannot be amplified by a division by
(almost) zero beyond ~1e-12, nor flip the sign gate of Gamma.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

DTYPE = torch.float64
TOLERANCE = 1e-10
MIN_CONDITIONING = 1e-4  # |den| / sum|terms| of every denominator that is not sign-definite
MAX_REDRAWS = 200


def _load_reference():
    """Load ``tests/reference.py`` by path (``tests`` is not a package)."""
    name = "lrpkit_tests_reference"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "reference.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ref = _load_reference()


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: one intra-op thread avoids thread hand-off costs that, on a
    loaded machine, made every float64 conv ~100x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------
# calling lrpkit (imported lazily, so the reference self-checks run on their own)
# --------------------------------------------------------------------------------------
def _lrpkit():
    from lrpkit import rules
    from lrpkit.attribution import Gradient
    from lrpkit.composites import LayerMapComposite

    return rules, LayerMapComposite, Gradient


def make_rule(name: str, kwargs: dict[str, Any], zero_params: Any = "omit"):
    rules, _, _ = _lrpkit()
    kwargs = dict(kwargs)
    if zero_params != "omit":
        kwargs["zero_params"] = zero_params
    return getattr(rules, name)(**kwargs)


def lrpkit_relevance(module: torch.nn.Module, rule, x: torch.Tensor, relevance_out: torch.Tensor, device: str = "cpu"):
    """Relevance at the input of ``module`` (wrapped in a Sequential) under ``rule``."""
    _, LayerMapComposite, Gradient = _lrpkit()
    model = torch.nn.Sequential(module).to(device)
    composite = LayerMapComposite([(type(module), rule)], canonizers=[])
    output, relevance_in = Gradient(model, composite=composite)(x.to(device), target=relevance_out.to(device))
    return output, relevance_in


def assert_matches(ours: torch.Tensor, expected: torch.Tensor, what: str = "", tol: float = TOLERANCE) -> None:
    assert tuple(ours.shape) == tuple(expected.shape), f"{what}: shape {tuple(ours.shape)} != {tuple(expected.shape)}"
    assert ours.dtype == DTYPE, f"{what}: dtype {ours.dtype}, expected float64"
    assert torch.isfinite(expected).all(), f"{what}: reference is not finite (bad test data)"
    assert torch.isfinite(ours.detach().cpu()).all(), f"{what}: lrpkit relevance has non-finite entries"
    err = ref.relative_error(ours, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} (max|ref| = {expected.abs().max().item():.3e})"


# --------------------------------------------------------------------------------------
# cases: layers, inputs, rules
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerCase:
    id: str
    factory: Callable[[], torch.nn.Module]
    in_shape: tuple[int, ...]  # one sample
    batch: int = 2

    @property
    def is_linear(self) -> bool:
        return isinstance(self.factory(), torch.nn.Linear)

    def channel_shape(self) -> tuple[int, ...]:
        """Shape of a per-channel bound that broadcasts against the (batched) input."""
        if self.is_linear:
            return (self.in_shape[-1],)
        return (self.in_shape[0],) + (1,) * (len(self.in_shape) - 1)


nn = torch.nn
LAYER_CASES = [
    LayerCase("linear", lambda: nn.Linear(7, 5), (7,), batch=3),
    LayerCase("linear-nobias", lambda: nn.Linear(7, 5, bias=False), (7,), batch=3),
    LayerCase("linear-3d", lambda: nn.Linear(6, 4), (3, 6)),
    LayerCase("conv1d", lambda: nn.Conv1d(3, 4, 3), (3, 7)),
    LayerCase("conv1d-s2p1-nobias", lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, bias=False), (3, 7)),
    LayerCase("conv1d-dil2-p2", lambda: nn.Conv1d(2, 3, 3, dilation=2, padding=2), (2, 7)),
    LayerCase("conv2d", lambda: nn.Conv2d(3, 4, 3), (3, 6, 6)),
    LayerCase("conv2d-nobias", lambda: nn.Conv2d(3, 4, 2, bias=False), (3, 5, 5)),
    LayerCase("conv2d-s2p1", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 7, 7)),
    LayerCase("conv2d-rect-s12", lambda: nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0)), (2, 5, 6)),
    LayerCase("conv2d-groups2-s2p1", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (4, 6, 6)),
    LayerCase("conv2d-depthwise-p1", lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3), (3, 5, 5)),
    LayerCase("conv2d-depthwise-x2-nobias", lambda: nn.Conv2d(3, 6, 3, groups=3, bias=False), (3, 5, 5)),
    # non-zero padding modes and string padding take lrpkit's generic (vjp) path
    LayerCase("conv2d-circular-p1", lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 5, 5)),
    LayerCase("conv1d-same-dil2-nobias", lambda: nn.Conv1d(2, 3, 3, padding="same", dilation=2, bias=False), (2, 7)),
    LayerCase("conv3d", lambda: nn.Conv3d(2, 3, 2), (2, 4, 4, 4)),
    LayerCase("conv3d-s2p1-nobias", lambda: nn.Conv3d(2, 3, 3, stride=2, padding=1, bias=False), (2, 5, 5, 5)),
    LayerCase("convT1d", lambda: nn.ConvTranspose1d(3, 4, 3), (3, 5)),
    LayerCase("convT1d-s2p1-op1-nobias", lambda: nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1, output_padding=1, bias=False), (3, 5)),
    LayerCase("convT2d", lambda: nn.ConvTranspose2d(3, 4, 3), (3, 5, 5)),
    LayerCase("convT2d-s2p1-groups2-nobias", lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False), (4, 5, 5)),
    LayerCase("convT2d-s2-dil2", lambda: nn.ConvTranspose2d(2, 3, 2, stride=2, dilation=2), (2, 4, 4)),
    LayerCase("convT3d-s2", lambda: nn.ConvTranspose3d(2, 3, 2, stride=2), (2, 3, 3, 3)),
]
LAYER_BY_ID = {case.id: case for case in LAYER_CASES}

INPUT_KINDS = ["signed", "nonneg", "nonneg-zeros"]


@dataclass(frozen=True)
class RuleCase:
    id: str
    name: str
    kwargs: dict[str, Any]

    def resolved_kwargs(self, layer_case: LayerCase) -> dict[str, Any]:
        """kwargs with the symbolic per-channel ZBox bounds turned into tensors."""
        kwargs = dict(self.kwargs)
        if kwargs.get("low") == "channel":
            n = layer_case.channel_shape()[0]
            shape = layer_case.channel_shape()
            kwargs["low"] = (-4.0 - torch.linspace(0.0, 1.0, n, dtype=DTYPE)).reshape(shape)
            kwargs["high"] = (4.0 + torch.linspace(0.0, 2.0, n, dtype=DTYPE)).reshape(shape)
        elif kwargs.get("low") == "element":  # one bound per input element of a sample
            n = math.prod(layer_case.in_shape)
            kwargs["low"] = (-5.0 + torch.linspace(0.0, 1.0, n, dtype=DTYPE)).reshape(layer_case.in_shape)
            kwargs["high"] = (4.0 + torch.linspace(0.0, 2.0, n, dtype=DTYPE)).reshape(layer_case.in_shape)
        return kwargs


RULE_CASES = [
    RuleCase("epsilon", "Epsilon", {}),
    RuleCase("epsilon0", "Epsilon", {"epsilon": 0.0}),
    RuleCase("zplus", "ZPlus", {}),
    RuleCase("alpha2beta1", "AlphaBeta", {"alpha": 2, "beta": 1}),
    RuleCase("alpha1beta0", "AlphaBeta", {"alpha": 1, "beta": 0}),
    RuleCase("gamma0.25", "Gamma", {"gamma": 0.25}),
    RuleCase("gamma100", "Gamma", {"gamma": 100.0}),
    RuleCase("zbox-float", "ZBox", {"low": -5.0, "high": 5.0}),
    RuleCase("zbox-channel", "ZBox", {"low": "channel", "high": "channel"}),
    RuleCase("flat", "Flat", {}),
    RuleCase("wsquare", "WSquare", {}),
]

# a stabiliser large enough to matter (checks that it is used, with sign(0) = +1), and a
# ZBox whose lower bound sits inside the data range; run over fewer layers
EXTRA_RULE_CASES = [
    RuleCase("epsilon0.25", "Epsilon", {"epsilon": 0.25}),
    RuleCase("zplus-stab0.1", "ZPlus", {"stabilizer": 0.1}),
    RuleCase("alpha2beta1-stab0.1", "AlphaBeta", {"alpha": 2, "beta": 1, "stabilizer": 0.1}),
    RuleCase("gamma0.25-stab0.1", "Gamma", {"gamma": 0.25, "stabilizer": 0.1}),
    RuleCase("zbox-0-3", "ZBox", {"low": 0.0, "high": 3.0}),
    RuleCase("zbox-element", "ZBox", {"low": "element", "high": "element"}),
    RuleCase("flat-stab0.1", "Flat", {"stabilizer": 0.1}),
]
EXTRA_LAYER_IDS = ["linear", "linear-3d", "conv1d-s2p1-nobias", "conv2d-groups2-s2p1", "conv3d", "convT2d"]


def _seed(*parts: Any) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode()) % (2**31)


def build_layer(layer_case: LayerCase, seed: int) -> torch.nn.Module:
    """The layer in float64 with weights and bias drawn from ``seed`` (bias signed, O(1))."""
    generator = torch.Generator().manual_seed(seed)
    layer = layer_case.factory().to(DTYPE)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator, dtype=DTYPE) * 0.5)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator, dtype=DTYPE))
    return layer


def draw_input(kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    values = torch.randn(shape, generator=generator, dtype=DTYPE)
    if kind == "signed":
        return values
    if kind == "nonneg":
        return values.abs() + 0.05
    if kind == "nonneg-zeros":
        return values.clamp(min=0)  # about half exact zeros
    raise ValueError(kind)


@dataclass
class Case:
    layer: torch.nn.Module
    x: torch.Tensor
    relevance_out: torch.Tensor
    expected: torch.Tensor
    seed: int


def draw_case(layer_case: LayerCase, input_kind: str, rule_name: str, rule_kwargs: dict, zero_params, tag: str = "") -> Case:
    """Random layer, input and output relevance with well-conditioned reference denominators."""
    base = _seed(layer_case.id, input_kind, rule_name, rule_kwargs.keys(), zero_params, tag)
    lrp0_on_zeros = rule_name == "Epsilon" and rule_kwargs.get("epsilon") == 0.0 and input_kind == "nonneg-zeros"
    for attempt in range(20 if lrp0_on_zeros else MAX_REDRAWS):
        seed = base + attempt
        layer = build_layer(layer_case, seed)
        generator = torch.Generator().manual_seed(seed + 1_000_003)
        x = draw_input(input_kind, (layer_case.batch, *layer_case.in_shape), generator)
        with torch.no_grad():
            out = layer(x)
        relevance_out = torch.randn(out.shape, generator=generator, dtype=DTYPE)
        result = ref.reference_relevance(rule_name, layer, x, relevance_out, zero_params=zero_params, **rule_kwargs)
        if result.min_conditioning() > MIN_CONDITIONING and torch.isfinite(result.relevance).all():
            return Case(layer, x, relevance_out, result.relevance, seed)
    if lrp0_on_zeros:
        # LRP-0 is 0/0 where a receptive field is all zeros; on small kernels (e.g. a stride-2
        # transposed conv sees one input per channel) practically every draw has one.
        pytest.skip("Epsilon(0) is undefined (0/0) on this layer for inputs with many exact zeros")
    raise RuntimeError(f"no well-conditioned draw for {layer_case.id}/{input_kind}/{rule_name} in {MAX_REDRAWS} tries")


# --------------------------------------------------------------------------------------
# the main matrix: every parameterised rule x zero_params x layer x input kind
# --------------------------------------------------------------------------------------
def check_rule_against_reference(rule_case: RuleCase, zero_params, layer_case: LayerCase, input_kind: str) -> None:
    kwargs = rule_case.resolved_kwargs(layer_case)
    case = draw_case(layer_case, input_kind, rule_case.name, kwargs, zero_params)
    params_before = {k: v.clone() for k, v in case.layer.state_dict().items()}

    rule = make_rule(rule_case.name, kwargs, zero_params)
    output, relevance_in = lrpkit_relevance(case.layer, rule, case.x, case.relevance_out)

    assert_matches(relevance_in, case.expected, f"{rule_case.id}/{zero_params}/{layer_case.id}/{input_kind} seed={case.seed}")
    with torch.no_grad():
        assert torch.allclose(output, case.layer(case.x), rtol=1e-12, atol=1e-12), "output is not the layer's output"
    for key, value in case.layer.state_dict().items():
        assert torch.equal(value, params_before[key]), f"parameter {key} changed by the attribution"


@pytest.mark.parametrize("input_kind", INPUT_KINDS)
@pytest.mark.parametrize("layer_case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
@pytest.mark.parametrize("zero_params", [None, "bias"], ids=["zp-none", "zp-bias"])
@pytest.mark.parametrize("rule_case", RULE_CASES, ids=[c.id for c in RULE_CASES])
def test_rule_matches_reference(rule_case: RuleCase, zero_params, layer_case: LayerCase, input_kind: str):
    check_rule_against_reference(rule_case, zero_params, layer_case, input_kind)


@pytest.mark.parametrize("input_kind", INPUT_KINDS)
@pytest.mark.parametrize("layer_id", EXTRA_LAYER_IDS)
@pytest.mark.parametrize("zero_params", [None, "bias"], ids=["zp-none", "zp-bias"])
@pytest.mark.parametrize("rule_case", EXTRA_RULE_CASES, ids=[c.id for c in EXTRA_RULE_CASES])
def test_rule_variants_match_reference(rule_case: RuleCase, zero_params, layer_id: str, input_kind: str):
    check_rule_against_reference(rule_case, zero_params, LAYER_BY_ID[layer_id], input_kind)


@pytest.mark.parametrize(
    "rule_case",
    [RuleCase("epsilon", "Epsilon", {}), RuleCase("zplus", "ZPlus", {}), RuleCase("alpha2beta1", "AlphaBeta", {}),
     RuleCase("gamma0.25", "Gamma", {}), RuleCase("zbox-float", "ZBox", {"low": -5.0, "high": 5.0})],
    ids=lambda c: c.id,
)
@pytest.mark.parametrize("layer_id", ["linear", "conv2d-s2p1", "convT2d"])
def test_zero_params_tuple_form(rule_case: RuleCase, layer_id: str):
    """``zero_params=("bias",)`` means the same as ``"bias"``; default args mean ``zero_params=None``."""
    layer_case = LAYER_BY_ID[layer_id]
    case = draw_case(layer_case, "signed", rule_case.name, rule_case.kwargs, "bias", tag="tuple")
    _, relevance_in = lrpkit_relevance(case.layer, make_rule(rule_case.name, rule_case.kwargs, ("bias",)), case.x, case.relevance_out)
    assert_matches(relevance_in, case.expected, f"{rule_case.id} zero_params=('bias',)")

    case = draw_case(layer_case, "signed", rule_case.name, rule_case.kwargs, None, tag="default")
    _, relevance_in = lrpkit_relevance(case.layer, make_rule(rule_case.name, rule_case.kwargs), case.x, case.relevance_out)
    assert_matches(relevance_in, case.expected, f"{rule_case.id} default zero_params")


# --------------------------------------------------------------------------------------
# Norm over parameter-free pooling
# --------------------------------------------------------------------------------------
POOL_CASES = [
    ("avgpool-k2s2", lambda: nn.AvgPool2d(2, stride=2), (3, 6, 6)),
    ("avgpool-k3s1p1", lambda: nn.AvgPool2d(3, stride=1, padding=1), (3, 5, 5)),
    ("adaptive-2x2-of-5x5", lambda: nn.AdaptiveAvgPool2d((2, 2)), (3, 5, 5)),
    ("adaptive-1", lambda: nn.AdaptiveAvgPool2d(1), (3, 5, 5)),
]


@pytest.mark.parametrize("stabilizer", [None, 0.1], ids=["stab-default", "stab0.1"])
@pytest.mark.parametrize("input_kind", INPUT_KINDS)
@pytest.mark.parametrize("pool_id, factory, in_shape", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_norm_on_pooling(pool_id, factory, in_shape, input_kind, stabilizer):
    pool = factory()
    J, out_shape = ref.dense_linear_map(pool, in_shape)
    stab = 1e-6 if stabilizer is None else stabilizer
    for attempt in range(MAX_REDRAWS):
        generator = torch.Generator().manual_seed(_seed(pool_id, input_kind, stabilizer) + attempt)
        x = draw_input(input_kind, (2, *in_shape), generator)
        relevance_out = torch.randn((2, *out_shape), generator=generator, dtype=DTYPE)
        result = ref.norm(J, x.reshape(2, -1), relevance_out.reshape(2, -1), stabilizer=stab)
        if result.min_conditioning() > MIN_CONDITIONING:
            break
    else:
        raise RuntimeError("no well-conditioned draw")
    rule = make_rule("Norm", {} if stabilizer is None else {"stabilizer": stabilizer})
    _, relevance_in = lrpkit_relevance(pool, rule, x, relevance_out)
    assert_matches(relevance_in, result.relevance.reshape(x.shape), f"Norm/{pool_id}/{input_kind}")


class _Call(torch.nn.Module):
    """``function(x, **arguments)``: a call the model makes itself, captured."""

    def __init__(self, function: Callable[..., torch.Tensor], **arguments) -> None:
        super().__init__()
        self.function = function
        self.arguments = arguments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x, **self.arguments)


def _fnet_mixing(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftn(x, dim=(-2, -1)).real


_FILTER = torch.polar(torch.linspace(0.5, 1.5, 4, dtype=DTYPE), torch.linspace(-1.0, 2.0, 4, dtype=DTYPE))


def _spectral_filter(x: torch.Tensor) -> torch.Tensor:
    spectrum = torch.fft.rfft(x, dim=-1, norm="ortho")[..., :4] * _FILTER
    return torch.fft.irfft(spectrum, n=x.shape[-1], dim=-1, norm="ortho")


def _kept_modes(x: torch.Tensor) -> torch.Tensor:
    """A Fourier neural operator's spectral layer: the lowest modes (and the highest) of a zero spectrum written with a filter."""
    spectrum = torch.fft.rfft(x, dim=-1)
    kept = torch.zeros(spectrum.shape, dtype=spectrum.dtype)
    kept[..., :3] = spectrum[..., :3] * _FILTER[:3]
    kept[..., -1:] = spectrum[..., -1:] * 0.5
    return torch.fft.irfft(kept, n=x.shape[-1], dim=-1)


_THETA = torch.tensor([[0.8, 0.25, 0.1], [-0.2, 0.9, -0.05]], dtype=DTYPE)


def _sampled(x: torch.Tensor, mode: str) -> torch.Tensor:
    """``F.grid_sample`` of ``x`` on a fixed rotated, scaled and shifted grid (a spatial transformer's sampling)."""
    grid = torch.nn.functional.affine_grid(_THETA.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode=mode, align_corners=False)


def _pooled_regions(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``roi_align``: one fixed box per image (partly beyond it), 2x2 bins of 2x2 samples."""
    from torchvision.ops import roi_align

    box = torch.tensor([[0.5, 1.0, 4.5, 6.0]], dtype=x.dtype).expand(x.shape[0], 4)
    boxes = torch.cat([torch.arange(x.shape[0], dtype=x.dtype)[:, None], box], dim=1)
    return roi_align(x, boxes, output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def _interpolate(**arguments) -> _Call:
    return _Call(torch.nn.functional.interpolate, **arguments)


RESAMPLE_CASES = [
    ("upsample-nearest-x2", lambda: torch.nn.Upsample(scale_factor=2), (2, 3, 3)),
    ("upsample-bilinear-x2", lambda: torch.nn.Upsample(scale_factor=2, mode="bilinear"), (2, 3, 4)),
    ("bilinear-align-corners", lambda: _interpolate(size=(5, 6), mode="bilinear", align_corners=True), (2, 3, 4)),
    ("bicubic-to-7x5", lambda: _interpolate(size=(7, 5), mode="bicubic"), (1, 4, 4)),
    ("area-5x5-to-3x3", lambda: _interpolate(size=(3, 3), mode="area"), (2, 5, 5)),
    ("linear-1d", lambda: _interpolate(scale_factor=1.5, mode="linear"), (3, 4)),
    ("cumsum", lambda: _Call(torch.cumsum, dim=-1), (3, 5)),  # a sum per position (captured.Pool)
    # Fourier chains of one activation back to real values (captured.Fourier): FNet's mixing, a spectral filter
    ("fftn-real", lambda: _Call(_fnet_mixing), (4, 5)),
    ("rfft-filter-irfft", lambda: _Call(_spectral_filter), (2, 6)),
    ("rfft-modes-written-irfft", lambda: _Call(_kept_modes), (2, 8)),
    # sampling on a grid (captured.Resample): bilinear and nearest
    ("grid-sample-bilinear", lambda: _Call(_sampled, mode="bilinear"), (2, 5, 5)),
    ("grid-sample-nearest", lambda: _Call(_sampled, mode="nearest"), (1, 5, 6)),
    ("roi-align", lambda: _Call(_pooled_regions), (2, 5, 5)),
]


@pytest.mark.parametrize("input_kind", INPUT_KINDS)
@pytest.mark.parametrize("case_id, factory, in_shape", RESAMPLE_CASES, ids=[c[0] for c in RESAMPLE_CASES])
def test_norm_on_resampling(case_id, factory, in_shape, input_kind):
    """``F.interpolate``, ``F.grid_sample``, ``roi_align``, ``cumsum`` and Fourier chains (captured, inside a module without a rule) get ``Norm``, the split of a linear map."""
    module = factory()
    J, out_shape = ref.dense_linear_map(module, in_shape)
    for attempt in range(MAX_REDRAWS):
        generator = torch.Generator().manual_seed(_seed(case_id, input_kind, None) + attempt)
        x = draw_input(input_kind, (2, *in_shape), generator)
        relevance_out = torch.randn((2, *out_shape), generator=generator, dtype=DTYPE)
        result = ref.norm(J, x.reshape(2, -1), relevance_out.reshape(2, -1), stabilizer=1e-6)
        if result.min_conditioning() > MIN_CONDITIONING:
            break
    else:
        raise RuntimeError("no well-conditioned draw")
    from lrpkit import composites

    _, _, Gradient = _lrpkit()
    composite = composites.LayerMapComposite(composites.layer_map_base())
    _, relevance_in = Gradient(torch.nn.Sequential(module), composite=composite)(x, target=relevance_out)
    assert_matches(relevance_in, result.relevance.reshape(x.shape), f"Norm/{case_id}/{input_kind}")


# --------------------------------------------------------------------------------------
# element-wise rules
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule_name, activation, reference_fn",
    [
        ("Pass", nn.ReLU, ref.pass_through),
        ("Pass", nn.Tanh, ref.pass_through),
        ("GuidedBackprop", nn.ReLU, ref.guided_backprop),
        ("Deconvnet", nn.ReLU, ref.deconvnet),
    ],
    ids=["pass-relu", "pass-tanh", "guided-relu", "deconvnet-relu"],
)
@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 5, 5)], ids=["2d", "4d"])
def test_elementwise_rules(rule_name, activation, reference_fn, shape):
    generator = torch.Generator().manual_seed(_seed(rule_name, activation.__name__, shape))
    x = torch.randn(shape, generator=generator, dtype=DTYPE)
    x.view(-1)[:3] = 0.0  # exact zeros at the ReLU kink
    relevance_out = torch.randn(shape, generator=generator, dtype=DTYPE)
    expected = reference_fn(x, relevance_out)
    _, relevance_in = lrpkit_relevance(activation(), make_rule(rule_name, {}), x, relevance_out)
    assert_matches(relevance_in, expected, f"{rule_name}/{activation.__name__}", tol=0.0)
    if rule_name == "Pass" and activation is nn.Tanh:
        gradient = relevance_out * (1 - torch.tanh(x) ** 2)
        assert ref.relative_error(relevance_in, gradient) > 1e-3, "Pass on Tanh must not return the gradient"


# --------------------------------------------------------------------------------------
# batch independence: a mixed batch (non-negative, signed, non-negative with zeros samples)
# must give each sample the relevance it gets alone -- also when the single-path shortcut
# for non-negative inputs is taken for a sample alone but not for the batch.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rule_case",
    [RuleCase("epsilon", "Epsilon", {}), RuleCase("zplus", "ZPlus", {}), RuleCase("alpha2beta1", "AlphaBeta", {}),
     RuleCase("gamma0.25", "Gamma", {}), RuleCase("zbox-float", "ZBox", {"low": -5.0, "high": 5.0}),
     RuleCase("flat", "Flat", {}), RuleCase("wsquare", "WSquare", {})],
    ids=lambda c: c.id,
)
@pytest.mark.parametrize("layer_id", ["linear-3d", "conv2d-groups2-s2p1", "conv1d-s2p1-nobias", "convT2d"])
def test_batch_independence(rule_case: RuleCase, layer_id: str):
    layer_case = LAYER_BY_ID[layer_id]
    base = _seed("batch", rule_case.id, layer_id)
    for attempt in range(MAX_REDRAWS):
        layer = build_layer(layer_case, base + attempt)
        generator = torch.Generator().manual_seed(base + attempt + 7)
        x = torch.stack([draw_input(kind, layer_case.in_shape, generator) for kind in ("nonneg", "signed", "nonneg-zeros")])
        with torch.no_grad():
            relevance_out = torch.randn(layer(x).shape, generator=generator, dtype=DTYPE)
        result = ref.reference_relevance(rule_case.name, layer, x, relevance_out, **rule_case.kwargs)
        if result.min_conditioning() > MIN_CONDITIONING:
            break
    else:
        raise RuntimeError("no well-conditioned draw")

    rule = make_rule(rule_case.name, rule_case.kwargs)
    _, batched = lrpkit_relevance(layer, rule, x, relevance_out)
    assert_matches(batched, result.relevance, f"{rule_case.id}/{layer_id} mixed batch vs reference")
    for i in range(x.shape[0]):
        _, alone = lrpkit_relevance(layer, make_rule(rule_case.name, rule_case.kwargs), x[i : i + 1], relevance_out[i : i + 1])
        assert_matches(alone[0], batched[i].detach(), f"{rule_case.id}/{layer_id} sample {i} alone vs in batch")


# --------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs, pattern",
    [
        ("AlphaBeta", {"alpha": 1, "beta": 1}, "alpha|beta"),
        ("AlphaBeta", {"alpha": -1, "beta": -2}, "alpha|beta"),
        ("AlphaBeta", {"alpha": 3, "beta": 1}, "alpha|beta"),
        ("Gamma", {"gamma": -0.1}, "gamma"),
        ("Epsilon", {"epsilon": -1}, "epsilon"),
    ],
    ids=["ab-1-1", "ab-neg", "ab-3-1", "gamma-neg", "epsilon-neg"],
)
def test_rule_argument_validation(name, kwargs, pattern):
    with pytest.raises(ValueError, match=f"(?i){pattern}"):
        make_rule(name, kwargs)


# --------------------------------------------------------------------------------------
# outputs that are exactly zero by cancellation (not structurally): here the conventions
# sign(0) = +1 of the stabiliser and "nothing flows where z == 0" of Gamma decide the result.
# Dyadic numbers keep every sum exact in any summation order.
# --------------------------------------------------------------------------------------
def _exact_zero_linear() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    layer = nn.Linear(2, 2).to(DTYPE)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.5], [1.0, 0.25]], dtype=DTYPE))
        layer.bias.copy_(torch.tensor([1.0, -0.5], dtype=DTYPE))
    # z = W a + b: sample 0 (0, 0.75), sample 1 (0.5, 1.75), sample 2 (1, 2.75) with W a = (0, 3.25);
    # ZBox(low=-2, high=0): z = W a - W+ l - W- h is exactly 0 for sample 0, output 0
    x = torch.tensor([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]], dtype=DTYPE)
    relevance_out = torch.tensor([[1.0, -2.0], [0.5, 1.0], [-1.5, 0.75]], dtype=DTYPE)
    return layer, x, relevance_out


@pytest.mark.parametrize(
    "rule_case, zero_params",
    [
        (RuleCase("epsilon", "Epsilon", {}), None),
        (RuleCase("epsilon0.25", "Epsilon", {"epsilon": 0.25}), None),
        (RuleCase("epsilon0.25", "Epsilon", {"epsilon": 0.25}), "bias"),
        (RuleCase("gamma0.25", "Gamma", {"gamma": 0.25}), None),
        (RuleCase("gamma0.25", "Gamma", {"gamma": 0.25}), "bias"),
        (RuleCase("zbox", "ZBox", {"low": -2.0, "high": 0.0}), None),
    ],
    ids=["epsilon", "epsilon0.25", "epsilon0.25-zp-bias", "gamma", "gamma-zp-bias", "zbox"],
)
def test_exact_zero_output_linear(rule_case: RuleCase, zero_params):
    layer, x, relevance_out = _exact_zero_linear()
    expected = ref.reference_relevance(rule_case.name, layer, x, relevance_out, zero_params=zero_params, **rule_case.kwargs).relevance
    _, relevance_in = lrpkit_relevance(layer, make_rule(rule_case.name, rule_case.kwargs, zero_params), x, relevance_out)
    assert_matches(relevance_in, expected, f"{rule_case.id} with an output exactly 0")


def test_exact_zero_output_conv_and_pool():
    """A difference kernel on a piecewise-constant signal and an average pool over windows that
    sum to zero: exact zeros of z with non-zero terms; sign(0) = +1 decides the sign of R_in."""
    conv = nn.Conv1d(1, 1, 2, bias=False).to(DTYPE)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, -1.0]]], dtype=DTYPE))
    x = torch.tensor([[[1.0, 1.0, 1.0, 2.0, 2.0]]], dtype=DTYPE)  # z = (0, 0, -1, 0)
    relevance_out = torch.tensor([[[1.0, -0.5, 2.0, 0.25]]], dtype=DTYPE)
    for kwargs in ({}, {"epsilon": 0.25}):
        expected = ref.reference_relevance("Epsilon", conv, x, relevance_out, **kwargs).relevance
        _, relevance_in = lrpkit_relevance(conv, make_rule("Epsilon", kwargs), x, relevance_out)
        assert_matches(relevance_in, expected, f"Epsilon{kwargs} on a conv output exactly 0")

    pool = nn.AvgPool2d(2)
    x = torch.tensor([[[[1.0, -1.0, 2.0, 0.5], [2.0, -2.0, 0.5, 1.0]]]], dtype=DTYPE)  # window sums 0 and 4
    relevance_out = torch.tensor([[[[1.5, -1.0]]]], dtype=DTYPE)
    J, _ = ref.dense_linear_map(pool, x.shape[1:])
    for stabilizer in (1e-6, 0.25):
        expected = ref.norm(J, x.reshape(1, -1), relevance_out.reshape(1, -1), stabilizer=stabilizer).relevance.reshape(x.shape)
        _, relevance_in = lrpkit_relevance(pool, make_rule("Norm", {"stabilizer": stabilizer}), x, relevance_out)
        assert_matches(relevance_in, expected, f"Norm(stabilizer={stabilizer}) on a pool output exactly 0")


# --------------------------------------------------------------------------------------
# a test can fail: lrpkit is far from a deliberately wrong formula
# --------------------------------------------------------------------------------------
def _zplus_without_positive_bias(layer: torch.nn.Module, x: torch.Tensor, relevance_out: torch.Tensor) -> torch.Tensor:
    """Deliberately WRONG z+: the b+ term is left out of the denominator."""
    dense = ref.dense_layer(layer, x.shape[1:])
    a, R = x.reshape(x.shape[0], -1), relevance_out.reshape(x.shape[0], -1)
    Wp, Wn = dense.weight.clamp(min=0), dense.weight.clamp(max=0)
    ap, an = a.clamp(min=0), a.clamp(max=0)
    s = R / ref.stab(ap @ Wp.T + an @ Wn.T, 1e-6)
    return (ap * (s @ Wp) + an * (s @ Wn)).reshape(x.shape)


@pytest.mark.parametrize("input_kind", ["signed", "nonneg"])
def test_lrpkit_differs_from_wrong_zplus(input_kind):
    layer_case = LAYER_BY_ID["conv2d"]
    layer = build_layer(layer_case, 5)
    with torch.no_grad():
        layer.bias.copy_(layer.bias.abs() + 0.5)  # clearly positive bias
    generator = torch.Generator().manual_seed(11)
    x = draw_input(input_kind, (2, *layer_case.in_shape), generator)
    relevance_out = torch.randn(layer(x).shape, generator=generator, dtype=DTYPE)
    wrong = _zplus_without_positive_bias(layer, x, relevance_out)
    right = ref.reference_relevance("ZPlus", layer, x, relevance_out).relevance
    _, ours = lrpkit_relevance(layer, make_rule("ZPlus", {}), x, relevance_out)
    assert_matches(ours, right, "ZPlus")
    assert ref.relative_error(ours, wrong) > 1e-2
    with pytest.raises(AssertionError):
        assert_matches(ours, wrong, "ZPlus vs wrong formula")


# --------------------------------------------------------------------------------------
# self-checks of the reference (need no lrpkit)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def test_reference_dense_matrices(layer_case: LayerCase):
    """W (identity basis) == jacrev Jacobian; elementwise W+, W-, W*W and the connectivity are
    the dense matrices of the layer with clamped / squared / all-one weights; b == layer(0)."""
    layer = build_layer(layer_case, 3)
    dense = ref.dense_layer(layer, layer_case.in_shape)
    weight = layer.weight.detach()
    has_bias = layer.bias is not None

    def with_weight(w):
        def fn(v):
            params = {"weight": w}
            if has_bias:
                params["bias"] = torch.zeros_like(layer.bias)
            return torch.func.functional_call(layer, params, (v,))

        return fn

    torch.testing.assert_close(dense.weight, ref.jacobian_by_autograd(with_weight(weight), layer_case.in_shape), rtol=0, atol=1e-14)
    for modified, dense_modified in [
        (weight.clamp(min=0), dense.weight.clamp(min=0)),
        (weight.clamp(max=0), dense.weight.clamp(max=0)),
        (weight * weight, dense.weight * dense.weight),
        (torch.ones_like(weight), dense.connectivity),
    ]:
        torch.testing.assert_close(dense_modified, ref.jacobian_by_autograd(with_weight(modified), layer_case.in_shape), rtol=0, atol=1e-14)
    assert torch.equal(dense.connectivity != 0, dense.weight != 0)
    x = torch.randn((2, *layer_case.in_shape), dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = layer(x).reshape(2, -1)
    torch.testing.assert_close(z, x.reshape(2, -1) @ dense.weight.T + dense.bias, rtol=1e-13, atol=1e-13)
    assert has_bias or torch.count_nonzero(dense.bias) == 0


@pytest.mark.parametrize("layer_case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def test_reference_epsilon0_is_gradient_times_input(layer_case: LayerCase):
    """Reference LRP-0 == a * vjp(layer, R / z) computed by torch autograd on the plain layer."""
    case = draw_case(layer_case, "signed", "Epsilon", {"epsilon": 0.0}, None, tag="selfcheck")
    x = case.x.clone().requires_grad_(True)
    z = case.layer(x)
    (grad,) = torch.autograd.grad(z, x, grad_outputs=case.relevance_out / z.detach())
    assert_matches(x.detach() * grad, case.expected, "Epsilon(0) reference vs gradient x input")


@pytest.mark.parametrize("layer_case", LAYER_CASES, ids=[c.id for c in LAYER_CASES])
def test_reference_conservation(layer_case: LayerCase):
    """Bias-free layer, strictly positive inputs, stabiliser ~0: the conservative rules keep
    sum R_in == sum of R_out over the outputs whose denominators are non-zero (an output with no
    positive weight, or no connection at all, e.g. odd positions of a dilated transposed conv,
    absorbs its relevance). AlphaBeta keeps alpha * (that sum) - beta * (the one for z-)."""
    TINY = 1e-300  # an absorbing output's 0 denominator becomes 1e-300: R/1e-300 * 0 = 0, not nan
    layer = build_layer(layer_case, 17)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.zero_()
    generator = torch.Generator().manual_seed(23)
    x = draw_input("nonneg", (layer_case.batch, *layer_case.in_shape), generator)
    with torch.no_grad():
        relevance_out = torch.randn(layer(x).shape, generator=generator, dtype=DTYPE)
    dense = ref.dense_layer(layer, layer_case.in_shape)
    a, R = x.reshape(x.shape[0], -1), relevance_out.reshape(x.shape[0], -1)
    W = dense.weight

    def kept(den):
        return (R * (den != 0)).sum(1)

    z = a @ W.T
    zp, zn = a @ W.clamp(min=0).T, a @ W.clamp(max=0).T
    connected = dense.connectivity.sum(1).expand_as(R)
    expected_totals = {
        "Epsilon": ({"epsilon": TINY}, kept(z)),
        "ZPlus": ({"stabilizer": TINY}, kept(zp)),
        "AlphaBeta": ({"alpha": 2, "beta": 1, "stabilizer": TINY}, 2 * kept(zp) - kept(zn)),
        "Gamma": ({"gamma": 0.25, "stabilizer": TINY}, kept(z)),
        "Flat": ({"stabilizer": TINY}, kept(connected)),
        "WSquare": ({"stabilizer": TINY}, kept(connected)),
        "ZBox": ({"low": -1.0, "high": 9.0, "stabilizer": TINY}, kept(connected)),
    }
    for name, (kwargs, total) in expected_totals.items():
        result = ref.reference_relevance(name, layer, x, relevance_out, **kwargs)
        relevance = result.relevance
        torch.testing.assert_close(relevance.reshape(x.shape[0], -1).sum(1), total, rtol=1e-11, atol=1e-11, msg=name)


@pytest.mark.parametrize("layer_id", ["linear", "conv2d-s2p1", "convT2d", "conv2d-groups2-s2p1"])
@pytest.mark.parametrize("input_kind", INPUT_KINDS)
def test_reference_rule_identities(layer_id: str, input_kind: str):
    """AlphaBeta(1, 0) == ZPlus; Gamma(0) == Epsilon (same stabiliser); ZBox(0, 0) == Epsilon without bias;
    Gamma(0.25) != Epsilon and AlphaBeta(2, 1) != ZPlus (the parameters matter)."""
    layer_case = LAYER_BY_ID[layer_id]
    case = draw_case(layer_case, input_kind, "Gamma", {"gamma": 0.25}, None, tag="identities")
    layer, x, R = case.layer, case.x, case.relevance_out

    def rel(name, **kwargs):
        return ref.reference_relevance(name, layer, x, R, **kwargs).relevance

    assert_matches(rel("AlphaBeta", alpha=1.0, beta=0.0), rel("ZPlus"), "AlphaBeta(1,0) vs ZPlus", tol=1e-13)
    assert_matches(rel("Gamma", gamma=0.0, stabilizer=1e-6), rel("Epsilon", epsilon=1e-6), "Gamma(0) vs Epsilon", tol=1e-12)
    assert_matches(rel("ZBox", low=0.0, high=0.0), rel("Epsilon", zero_params="bias"), "ZBox(0,0) vs Epsilon", tol=1e-12)
    assert ref.relative_error(rel("Gamma", gamma=0.25), rel("Epsilon")) > 1e-3
    if input_kind == "signed":
        assert ref.relative_error(rel("AlphaBeta", alpha=2.0, beta=1.0), rel("ZPlus")) > 1e-3


def test_reference_stab_sign_of_zero():
    v = torch.tensor([-2.0, -0.0, 0.0, 3.0], dtype=DTYPE)
    assert torch.equal(ref.stab(v, 0.5), torch.tensor([-2.5, 0.5, 0.5, 3.5], dtype=DTYPE))


def test_reference_differs_from_wrong_zplus():
    """The reference z+ includes b+: with a positive bias it is far from the b+-free formula,
    and the comparison helper does fail on it."""
    layer_case = LAYER_BY_ID["conv2d"]
    layer = build_layer(layer_case, 5)
    with torch.no_grad():
        layer.bias.copy_(layer.bias.abs() + 0.5)
    generator = torch.Generator().manual_seed(11)
    x = draw_input("nonneg", (2, *layer_case.in_shape), generator)
    relevance_out = torch.randn(layer(x).shape, generator=generator, dtype=DTYPE)
    right = ref.reference_relevance("ZPlus", layer, x, relevance_out).relevance
    wrong = _zplus_without_positive_bias(layer, x, relevance_out)
    assert ref.relative_error(wrong, right) > 1e-2
    with pytest.raises(AssertionError):
        assert_matches(wrong, right)
    # with the bias zeroed both agree -- the difference is exactly the b+ term
    right_no_bias = ref.reference_relevance("ZPlus", layer, x, relevance_out, zero_params="bias").relevance
    assert_matches(wrong, right_no_bias, "wrong formula == ZPlus with zero bias", tol=1e-13)


# --------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): lrpkit on the GPU against the CPU reference
# --------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule_case", RULE_CASES, ids=[c.id for c in RULE_CASES])
@pytest.mark.parametrize("layer_id", ["linear-3d", "conv2d-groups2-s2p1", "conv3d", "convT2d-s2p1-groups2-nobias"])
@pytest.mark.parametrize("input_kind", ["signed", "nonneg-zeros"])
def test_rule_matches_reference_cuda(rule_case: RuleCase, layer_id: str, input_kind: str):
    layer_case = LAYER_BY_ID[layer_id]
    kwargs = rule_case.resolved_kwargs(layer_case)
    case = draw_case(layer_case, input_kind, rule_case.name, kwargs, None, tag="cuda")
    device_kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    rule = make_rule(rule_case.name, device_kwargs, None)
    _, relevance_in = lrpkit_relevance(case.layer, rule, case.x, case.relevance_out, device="cuda")
    assert relevance_in.device.type == "cuda"
    assert_matches(relevance_in.cpu(), case.expected, f"cuda {rule_case.id}/{layer_id}/{input_kind}")
