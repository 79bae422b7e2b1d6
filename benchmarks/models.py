"""Whole-model suite: time and peak memory of one explanation, per composite and library.

For each model and batch size, every method explains the same input (uniform noise in
``[0, 1]``, so ``EpsilonGammaBox(low=0, high=1)`` has the true bounds) for the predicted class,
starting from the target logit's value (``one_hot(argmax) * output``), as lrpkit does by
default:

- ``gradient x input``: one forward, ``torch.autograd.grad`` to the input, times the input;
- ``lrpkit <composite>``: :class:`lrpkit.attribution.Gradient` with the composite (its context,
  canonizers included, is entered for each call);
- ``zennit <composite>``: zennit 0.5.1's ``Gradient`` attributor with the same composite and its
  canonizers (``ResNetCanonizer`` for ResNets, ``SequentialMergeBatchNorm`` otherwise), entered
  for each call;
- ``captum LRP``: Captum's ``LRP`` with its default rules, when Captum is installed.

Parameters are frozen (``requires_grad_(False)``) for every method during the measurement and
restored afterwards. The timed repeats are interleaved across methods (repeat 1 of every method,
then repeat 2, ...), so a change of machine load affects all methods alike. One more, untimed
call per method counts the FLOPs of its products (:mod:`benchmarks.flops`): the arithmetic,
which no load changes.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from .flops import count_flops
from .memory import PeakRss, cuda_peak_mib, rss_method, run_in_child
from .options import BenchOptions
from .timing import (
    elapsed_ms, frozen_parameters, map_large_allocations, median, paired_quartiles, ratio, set_threads, tune_malloc,
)

Explainer = Callable[[Tensor], Tensor]

#: Composites compared, by the name used in the tables ("Epsilon" is the epsilon-only map).
COMPOSITES = ("Epsilon", "EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1")

#: Issue 4's targets per composite: lrpkit time / gradient time at most ``time``, zennit time /
#: lrpkit time at least ``speedup`` (``None``: no target).
TIME_TARGETS: dict[str, tuple[float | None, float | None]] = {
    "Epsilon": (1.15, None),
    "EpsilonPlus": (None, None),
    "EpsilonPlusFlat": (1.7, 2.0),
    "EpsilonGammaBox": (2.2, 3.0),
    "EpsilonAlpha2Beta1": (2.2, 3.0),
}
#: Issue 4's memory targets for every composite: lrpkit peak / gradient peak, lrpkit / zennit.
MEMORY_TARGETS = (1.3, 0.6)

#: lrpkit-only variants of EpsilonPlus that measure what FunctionalCapture costs (issue 4: at most
#: 5% of the total time on ResNet50): without it (residual sums then get the plain gradient), and
#: with it but with no rule for any captured call (the interception alone).
NO_CAPTURE = "EpsilonPlus, no capture"
CAPTURE_NO_RULES = "EpsilonPlus, capture without op rules"
CAPTURE_VARIANTS = (NO_CAPTURE, CAPTURE_NO_RULES)
#: Issue 4's target: FunctionalCapture's share of EpsilonPlus's time.
CAPTURE_SHARE_TARGET = 0.05

DEFAULTS = {"models": ["vgg16", "resnet50"], "repeats": 5, "warmup": 1, "size": 224}
QUICK_DEFAULTS = {"models": ["tiny-vgg", "tiny-resnet"], "batches": [1], "repeats": 1, "warmup": 1, "size": 32}


# ------------------------------------------------------------------------------------ models


def tiny_vgg() -> nn.Module:
    """A VGG-shaped CNN with BatchNorm, small enough for smoke tests (10 classes)."""
    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]

    features = nn.Sequential(*block(3, 8), nn.MaxPool2d(2), *block(8, 16), nn.MaxPool2d(2))
    classifier = nn.Sequential(nn.Linear(16 * 2 * 2, 32), nn.ReLU(inplace=True), nn.Linear(32, 10))
    return nn.Sequential(features, nn.AdaptiveAvgPool2d(2), nn.Flatten(), classifier)


def tiny_resnet() -> nn.Module:
    """torchvision's ResNet with one basic block per stage (10 classes), for smoke tests."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


_CUSTOM_MODELS: dict[str, Callable[[], nn.Module]] = {"tiny-vgg": tiny_vgg, "tiny-resnet": tiny_resnet}


def build_model(name: str, seed: int = 0, weights: str | None = None) -> nn.Module:
    """Model ``name`` with seeded random weights (or ``weights``), in eval mode.

    ``name`` is ``tiny-vgg``, ``tiny-resnet``, a torchvision classification model (``vgg16``,
    ``resnet50``, ...; ``weights=None``) or your own as ``path/to/file.py:factory`` /
    ``package.module:factory`` (see :mod:`lrpkit.loading`). A dense layer initialised to zero
    (the classification head of torchvision's vision transformers) gets PyTorch's default random
    initialisation instead: with a zero head every output, and so every relevance, is zero.
    ``weights``: a ``state_dict`` file loaded afterwards.

    Raises
    ------
    ValueError
        If no such model exists, or the weights do not fit it.
    """
    from lrpkit.loading import is_model_spec, load_weights, model_from_spec

    factory = _CUSTOM_MODELS.get(name) or getattr(torchvision.models, name, None)
    if not is_model_spec(name) and (not callable(factory) or name.startswith("_")):
        raise ValueError(
            f"unknown model {name!r}: use tiny-vgg, tiny-resnet, a torchvision model name or "
            "path/to/file.py:factory"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_model_spec(name):
            model = model_from_spec(name)
        else:
            model = factory() if name in _CUSTOM_MODELS else factory(weights=None)
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.reset_parameters()
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def make_input(batch: int, shape: tuple[int, ...], device: str, seed: int = 1) -> Tensor:
    """``batch`` inputs of ``shape`` (RGB images: ``(3, H, W)``), uniform noise in ``[0, 1]``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *shape, generator=generator).to(device)


def is_resnet(model: nn.Module) -> bool:
    """Whether zennit's ``ResNetCanonizer`` applies (a torchvision ResNet)."""
    from torchvision.models.resnet import ResNet

    return isinstance(model, ResNet)


# ----------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One way to explain a model: a library and (for LRP) a composite."""

    library: str
    composite: str | None = None

    @property
    def name(self) -> str:
        """Name shown in the tables, e.g. ``lrpkit EpsilonPlusFlat``."""
        if self.library == "torch":
            return "gradient x input"
        if self.library == "captum":
            return "captum LRP (default rules)"
        return f"{self.library} {self.composite}"


GRADIENT = Method("torch")


def available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


#: The libraries compared with the gradient (``--libraries``).
LIBRARIES = ("lrpkit", "zennit", "captum")


def all_methods(composites: Sequence[str] | None = None, libraries: Sequence[str] | None = None) -> list[Method]:
    """The gradient, then lrpkit and zennit for every composite, then Captum if installed.

    ``composites`` and ``libraries`` (``None``: all) narrow the choice; the gradient, the
    baseline of every ratio, always runs. FunctionalCapture's two variants run with lrpkit's
    EpsilonPlus, which they are compared with.
    """
    chosen = LIBRARIES if libraries is None else tuple(libraries)
    wanted = COMPOSITES if composites is None else tuple(composites)
    methods = [GRADIENT]
    for composite in wanted:
        if "lrpkit" in chosen:
            methods.append(Method("lrpkit", composite))
        if "zennit" in chosen and available("zennit"):
            methods.append(Method("zennit", composite))
    if "lrpkit" in chosen and "EpsilonPlus" in wanted:
        methods += [Method("lrpkit", variant) for variant in CAPTURE_VARIANTS]
    if "captum" in chosen and available("captum"):
        methods.append(Method("captum", "Epsilon"))
    return methods


def one_hot_times_output(output: Tensor) -> Tensor:
    """``one_hot(argmax) * output``: the relevance that starts at the output (detached)."""
    values = output.detach()
    return nn.functional.one_hot(values.argmax(dim=1), values.shape[1]).to(values) * values


def lrpkit_composite(name: str) -> Any:
    """lrpkit's composite ``name`` (see :data:`COMPOSITES`) with its default canonizers."""
    from lrpkit import captured, composites, rules, types
    from lrpkit.canonizers import FunctionalCapture, MergeBatchNorm

    if name == NO_CAPTURE:
        return composites.EpsilonPlus(canonizers=[MergeBatchNorm()])
    if name == CAPTURE_NO_RULES:  # neither the composite nor the capture's defaults give an op a rule
        no_rule = [(captured.CapturedOp, None)]
        return composites.EpsilonPlus(layer_map=no_rule, canonizers=[MergeBatchNorm(), FunctionalCapture(rules=no_rule)])
    if name == "Epsilon":
        return composites.LayerMapComposite(composites.layer_map_base() + [(types.AnyLinear, rules.Epsilon())])
    if name == "EpsilonGammaBox":
        return composites.EpsilonGammaBox(low=0.0, high=1.0)
    return getattr(composites, name)()


def zennit_composite(name: str, model: nn.Module) -> Any:
    """zennit's composite ``name`` with the canonizers zennit recommends for ``model``."""
    from zennit import composites as zcomposites
    from zennit import rules as zrules
    from zennit import types as ztypes
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.torchvision import ResNetCanonizer

    canonizers = [ResNetCanonizer()] if is_resnet(model) else [SequentialMergeBatchNorm()]
    if name == "Epsilon":
        layer_map = zcomposites.layer_map_base() + [
            (ztypes.Convolution, zrules.Epsilon()),
            (nn.Linear, zrules.Epsilon()),
        ]
        return zcomposites.LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
    if name == "EpsilonGammaBox":
        return zcomposites.EpsilonGammaBox(low=0.0, high=1.0, canonizers=canonizers)
    return getattr(zcomposites, name)(canonizers=canonizers)


def gradient_explainer(model: nn.Module) -> Explainer:
    """Gradient x input of the target logit."""
    def explain(x: Tensor) -> Tensor:
        with torch.enable_grad():
            inputs = x.detach().requires_grad_(True)
            output = model(inputs)
            (gradient,) = torch.autograd.grad(output, inputs, one_hot_times_output(output))
        return gradient * x
    return explain


def lrpkit_explainer(model: nn.Module, composite: str) -> Explainer:
    """lrpkit's ``Gradient`` attributor with ``composite`` (entered for every call)."""
    from lrpkit.attribution import Gradient

    attributor = Gradient(model, composite=lrpkit_composite(composite))
    return lambda x: attributor(x).relevance


def zennit_explainer(model: nn.Module, composite: str) -> Explainer:
    """zennit's ``Gradient`` attributor with ``composite`` (entered for every call)."""
    from zennit.attribution import Gradient as ZennitGradient

    rules = zennit_composite(composite, model)

    def explain(x: Tensor) -> Tensor:
        with ZennitGradient(model, rules) as attributor:
            _, relevance = attributor(x.detach(), one_hot_times_output)
        return relevance.detach()
    return explain


def captum_explainer(model: nn.Module, x: Tensor) -> Explainer:
    """Captum's ``LRP`` with its default rules; the target class is computed once, beforehand."""
    from captum.attr import LRP

    with torch.no_grad():
        target = model(x).argmax(dim=1)
    lrp = LRP(model)
    return lambda inputs: lrp.attribute(inputs.detach().clone().requires_grad_(True), target=target).detach()


def make_explainer(method: Method, model: nn.Module, x: Tensor) -> Explainer:
    """The callable ``x -> relevance`` for ``method`` on ``model``."""
    if method.library == "torch":
        return gradient_explainer(model)
    if method.library == "lrpkit":
        assert method.composite is not None
        return lrpkit_explainer(model, method.composite)
    if method.library == "zennit":
        assert method.composite is not None
        return zennit_explainer(model, method.composite)
    if method.library == "captum":
        return captum_explainer(model, x)
    raise ValueError(f"unknown library {method.library!r}")


# ------------------------------------------------------------------------------------ memory


def initialise_runtime() -> None:
    """Run a tiny convolution and dense layer forward and backward.

    The first call of a kernel starts torch's thread pool and initialises oneDNN; that costs
    resident memory once per process, whatever the model. Doing it on tensors of a few KiB before
    the baseline keeps it out of the measurement without filling the allocator's caches.
    """
    layers = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                           nn.Linear(4 * 4 * 4, 2), nn.AdaptiveAvgPool1d(1))
    inputs = torch.rand(2, 3, 8, 8, requires_grad=True)
    torch.autograd.grad(layers(inputs).sum(), inputs)


def peak_rss_of_one_explanation(
    model_name: str,
    batch: int,
    shape: tuple[int, ...],
    method: Method,
    threads: int | None,
    malloc: str = "default",
    weights: str | None = None,
) -> float:
    """Run in a fresh child process: peak RSS increase (MiB) of one explanation after setup.

    ``shape``: the input's shape after the batch dimension. ``malloc``: ``"default"``,
    ``"tuned"`` (:func:`~benchmarks.timing.tune_malloc`) or ``"mapped"``
    (:func:`~benchmarks.timing.map_large_allocations`).
    """
    set_threads(threads)
    if malloc == "tuned":
        tune_malloc()
    elif malloc == "mapped" and not map_large_allocations():
        raise RuntimeError("glibc's mallopt is not available: no mapped measurement")
    initialise_runtime()
    model = build_model(model_name, weights=weights)
    x = make_input(batch, shape, "cpu")
    probe = PeakRss()
    with frozen_parameters(model):
        explain = make_explainer(method, model, x)
        probe.reset()
        explain(x)
        return probe.increase_mib()


# ------------------------------------------------------------------------------- measurement


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _safe(call: Callable[[], Any]) -> tuple[Any, str | None]:
    try:
        return call(), None
    except Exception as error:  # a method that fails is reported, not fatal
        return None, f"{type(error).__name__}: {error}"


def measure_configuration(
    model_name: str, batch: int, options: BenchOptions, methods: list[Method]
) -> list[dict[str, Any]]:
    """Time (and measure memory of) every method on one model and batch size; one row each."""
    device = options.device
    assert options.repeats is not None and options.warmup is not None
    model = build_model(model_name, weights=options.weights).to(device)
    x = make_input(batch, options.shape(), device)
    rows = {method: _empty_row(model_name, batch, options, method) for method in methods}
    relevances: dict[Method, Tensor] = {}
    explainers: dict[Method, Explainer] = {}
    with frozen_parameters(model):
        for method in methods:
            explain, error = _safe(lambda: make_explainer(method, model, x))
            if error is None:
                relevance, error = _safe(lambda: explain(x))  # first call: warm-up and agreement
            if error is not None:
                rows[method]["error"] = error
                _progress(f"  {method.name}: failed: {error}")
                continue
            relevances[method] = relevance
            explainers[method] = explain
        for _ in range(max(0, options.warmup - 1)):
            for explain in explainers.values():
                explain(x)
        times: dict[Method, list[float]] = {method: [] for method in explainers}
        for repeat in range(options.repeats):
            for method, explain in explainers.items():
                times[method].append(elapsed_ms(lambda: explain(x), device))
            _progress(f"  repeat {repeat + 1}/{options.repeats} done")
        for method, values in times.items():
            rows[method]["times_ms"] = [round(value, 3) for value in values]
            rows[method]["median_ms"] = median(values)
            _progress(f"  {method.name}: {median(values):.1f} ms")
        for method, explain in explainers.items():  # untimed: counting slows every operation down
            rows[method]["gflop"] = count_flops(lambda: explain(x)) / 1e9
        if options.memory:
            _measure_memory(model, model_name, batch, x, options, explainers, rows)
    _add_ratios(rows, relevances)
    return list(rows.values())


def _empty_row(model_name: str, batch: int, options: BenchOptions, method: Method) -> dict[str, Any]:
    return {
        "model": model_name,
        "batch": batch,
        "size": options.size,
        "input_shape": list(options.shape()),
        "device": options.device,
        "method": method.name,
        "library": method.library,
        "composite": method.composite,
        "median_ms": None,
        "times_ms": [],
        "ratio_vs_gradient": None,
        "ratio_vs_gradient_quartiles": None,
        "zennit_over_lrpkit": None,
        "zennit_over_lrpkit_quartiles": None,
        "gflop": None,
        "flops_vs_gradient": None,
        "peak_mib": None,
        "memory_vs_gradient": None,
        "memory_lrpkit_over_zennit": None,
        "peak_mib_mapped": None,
        "memory_vs_gradient_mapped": None,
        "memory_lrpkit_over_zennit_mapped": None,
        "max_rel_diff_vs_zennit": None,
        "error": None,
    }


def _measure_memory(
    model: nn.Module,
    model_name: str,
    batch: int,
    x: Tensor,
    options: BenchOptions,
    explainers: dict[Method, Explainer],
    rows: dict[Method, dict[str, Any]],
) -> None:
    for method, explain in explainers.items():
        row = rows[method]
        if options.device.startswith("cuda"):
            row["peak_mib"] = cuda_peak_mib(lambda: explain(x), options.device)
            _progress(f"  {method.name}: peak {row['peak_mib']} MiB")
            continue
        for key, malloc in (("peak_mib", options.malloc), ("peak_mib_mapped", "mapped")):
            result = run_in_child(
                peak_rss_of_one_explanation,
                model_name, batch, options.shape(), method, options.threads, malloc, options.weights,
            )
            if result.error is not None:
                row["error"] = f"memory ({malloc} allocator): {result.error.splitlines()[0]}"
            row[key] = result.value
        _progress(f"  {method.name}: peak {row['peak_mib']} MiB, {row['peak_mib_mapped']} MiB mapped")


def _add_ratios(rows: dict[Method, dict[str, Any]], relevances: dict[Method, Tensor]) -> None:
    gradient = rows.get(GRADIENT, {})
    for method, row in rows.items():
        row["ratio_vs_gradient"] = ratio(row["median_ms"], gradient.get("median_ms"))
        row["ratio_vs_gradient_quartiles"] = paired_quartiles(row["times_ms"], gradient.get("times_ms", []))
        row["flops_vs_gradient"] = ratio(row["gflop"], gradient.get("gflop"))
        row["memory_vs_gradient"] = ratio(row["peak_mib"], gradient.get("peak_mib"))
        row["memory_vs_gradient_mapped"] = ratio(row["peak_mib_mapped"], gradient.get("peak_mib_mapped"))
        if method.library not in ("lrpkit", "captum"):
            continue
        theirs = Method("zennit", method.composite)
        if theirs not in rows:
            continue
        if method in relevances and theirs in relevances:  # captum: its epsilon rules against zennit's
            ours, reference = relevances[method].double().cpu(), relevances[theirs].double().cpu()
            scale = float(reference.abs().max())
            row["max_rel_diff_vs_zennit"] = float((ours - reference).abs().max()) / scale if scale > 0 else None
        if method.library == "lrpkit":
            row["zennit_over_lrpkit"] = ratio(rows[theirs]["median_ms"], row["median_ms"])
            row["zennit_over_lrpkit_quartiles"] = paired_quartiles(rows[theirs]["times_ms"], row["times_ms"])
            row["memory_lrpkit_over_zennit"] = ratio(row["peak_mib"], rows[theirs]["peak_mib"])
            row["memory_lrpkit_over_zennit_mapped"] = ratio(row["peak_mib_mapped"], rows[theirs]["peak_mib_mapped"])


def run(options: BenchOptions) -> dict[str, Any]:
    """The whole-model suite: one row per (model, batch size, method)."""
    defaults = dict(QUICK_DEFAULTS if options.quick else DEFAULTS)
    if "batches" not in defaults:
        defaults["batches"] = [1, 8, 32] if options.device.startswith("cuda") else [1, 8]
    options = options.resolved(**defaults)
    assert options.models is not None and options.batches is not None
    methods = all_methods(options.composites, options.libraries)
    rows: list[dict[str, Any]] = []
    for model_name in options.models:
        for batch in options.batches:
            shape = "x".join(map(str, options.shape()))
            _progress(f"[models] {model_name}, batch {batch}, input {shape}, {options.device}")
            rows.extend(measure_configuration(model_name, batch, options, methods))
    notes = [
        "parameters frozen (requires_grad=False) for every method during the measurement, restored afterwards",
        "timed repeats interleaved across methods; median reported",
        "GFLOP: matrix products and convolutions of one explanation, forward and backward, counted "
        "exactly in a separate untimed call (benchmarks/flops.py); element-wise work not counted",
        "lrpkit and zennit enter their composite (canonizers included) for every call",
    ]
    if not available("captum"):
        notes.append("captum: not installed, skipped")
    else:
        notes.append("captum LRP: target classes computed once beforehand (not timed)")
    if not available("zennit"):
        notes.append("zennit: not installed, skipped")
    memory = ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory allocated "
              "before the call" if options.device.startswith("cuda") else rss_method())
    return {
        "suite": "models",
        "options": options.as_dict(),
        "memory_method": memory if options.memory else "not measured (--no-memory)",
        "notes": notes,
        "rows": rows,
    }
