"""Rule-cost suite: each rule's backward on single layers, relative to the plain input gradient.

Each layer is followed by a ReLU, as in a network. For every layer and rule, the same input
``x`` and the same relevance ``R`` at the ReLU's output go through

- the plain layer and ReLU (parameters frozen): ``torch.autograd.grad(relu(layer(x)), x, R)``,
  one transposed product -- the reference;
- a copy of both with the rule attached to the layer by an lrpkit composite (the ReLU passes the
  relevance on and lends its output to the rule; ``canonizers=[]``): the same call, whose
  backward is the rule.

``R = relu(z) * u`` with ``z`` the layer's output and ``u`` uniform in ``[0, 1]``. Rules whose
cost depends on the sign of the input (z+, gamma, alpha-beta) run on a non-negative input
(``>=0``, uniform in ``[0, 1]``: the input of any layer after a ReLU) and on a signed one
(``signed``, standard normal); the others on the non-negative input (``any``).

The floor is the number of layer-sized products (a forward of the layer, or its transposed
product) that the rule's formulation in :mod:`lrpkit.rules` needs, skipping parts that carry no
relevance; the plain gradient is 1. The products the rule actually ran are counted too, exactly,
in one more untimed backward (:mod:`benchmarks.flops`: the backward's FLOPs over the layer's
forward FLOPs). ``time ratio / floor`` near 1 means the rule costs what its products cost; above
1 is overhead (element-wise work, allocations, Python). The algebraic minimum is what the
products could be cut to by reusing the forward output ``z`` or by caching input-independent
terms.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .flops import count_flops
from .options import BenchOptions
from .timing import elapsed_ms, frozen_parameters, median, ratio

DEFAULTS = {"batches": [8], "repeats": 10, "warmup": 2}
QUICK_DEFAULTS = {"batches": [2], "repeats": 1, "warmup": 1}


@dataclass(frozen=True)
class LayerCase:
    """One layer to benchmark: a name, a factory and the input shape without the batch."""

    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


def layer_cases(quick: bool = False) -> list[LayerCase]:
    """The layers of issue 4 (or tiny stand-ins for smoke tests when ``quick``)."""
    if quick:
        return [
            LayerCase("Linear 64->64", lambda: nn.Linear(64, 64), (64,)),
            LayerCase("Conv2d 3x3 8->8 @8x8", lambda: nn.Conv2d(8, 8, 3, padding=1), (8, 8, 8)),
            LayerCase("Conv2d 3x3 16->16 @4x4", lambda: nn.Conv2d(16, 16, 3, padding=1), (16, 4, 4)),
            LayerCase("Conv2d 3x3 depthwise 8 @8x8", lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 8, 8)),
            LayerCase("ConvTranspose2d 3x3 8->8 @8x8", lambda: nn.ConvTranspose2d(8, 8, 3, padding=1), (8, 8, 8)),
        ]
    return [
        LayerCase("Linear 4096->4096", lambda: nn.Linear(4096, 4096), (4096,)),
        LayerCase("Conv2d 3x3 64->64 @56x56", lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 56, 56)),
        LayerCase("Conv2d 3x3 256->256 @14x14", lambda: nn.Conv2d(256, 256, 3, padding=1), (256, 14, 14)),
        LayerCase("Conv2d 3x3 depthwise 128 @28x28",
                  lambda: nn.Conv2d(128, 128, 3, padding=1, groups=128), (128, 28, 28)),
        LayerCase("ConvTranspose2d 3x3 64->64 @28x28",
                  lambda: nn.ConvTranspose2d(64, 64, 3, padding=1), (64, 28, 28)),
    ]


@dataclass(frozen=True)
class Floor:
    """Layer-sized products a rule needs: per its formulation, and the algebraic minimum."""

    products: int
    minimum: str
    note: str


#: ``(rule, input) -> Floor``; ``input`` is ``">=0"``, ``"signed"`` or ``"any"``.
FLOORS: dict[tuple[str, str], Floor] = {
    ("Epsilon", "any"): Floor(1, "1", "1 transposed; z is the forward output, reused"),
    ("ZPlus", ">=0"): Floor(2, "2", "1 forward (W+) + 1 transposed"),
    ("ZPlus", "signed"): Floor(4, "4", "2 forwards (W+ a+, W- a-) + 2 transposed"),
    ("Gamma", ">=0"): Floor(2, "2", "1 forward (W + g W+) + 1 transposed; no relevance where z < 0"),
    ("Gamma", "signed"): Floor(4, "4", "2 forwards + 2 transposed for the z > 0 part; the z < 0 part "
                                       "(2 + 2 more) only where it carries relevance"),
    ("AlphaBeta", ">=0"): Floor(3, "3", "1 forward (W+) + 2 transposed; W- a + b- = z - (W+ a + b+) from "
                                         "the saved output (a direct forward where that cancels)"),
    ("AlphaBeta", "signed"): Floor(8, "7", "4 forwards + 4 transposed; one forward follows from z"),
    ("ZBox", "any"): Floor(5, "5", "2 forwards (W+ l, W- h) + 3 transposed; W a + b is the saved "
                                   "forward output"),
    ("Flat", "any"): Floor(2, "<1", "1 forward (ones) + 1 transposed; both are independent of W and of "
                                    "the input: a cached count and a channel sum + box filter"),
    ("WSquare", "any"): Floor(2, "1", "1 forward (W^2 on ones) + 1 transposed; the forward is "
                                      "input-independent (cacheable per shape)"),
}


def rule_factories() -> dict[str, Callable[[], Any]]:
    """The rules benchmarked, by name (parameters as in the presets)."""
    from lrpkit import rules

    return {
        "Epsilon": rules.Epsilon,
        "ZPlus": rules.ZPlus,
        "Gamma": lambda: rules.Gamma(gamma=0.25),
        "AlphaBeta": lambda: rules.AlphaBeta(alpha=2.0, beta=1.0),
        "ZBox": lambda: rules.ZBox(low=0.0, high=1.0),
        "Flat": rules.Flat,
        "WSquare": rules.WSquare,
    }


def input_kinds(rule: str) -> list[str]:
    """The inputs a rule is measured on: both signs where its cost depends on them."""
    return [">=0", "signed"] if (rule, "signed") in FLOORS else ["any"]


@dataclass
class Participant:
    """One timed forward + backward: the plain layer, or a copy with one rule attached."""

    rule: str
    kind: str
    model: nn.Module
    x: Tensor
    relevance: Tensor
    forward_ms: list[float]
    backward_ms: list[float]

    def step(self, device: str) -> None:
        """Time one forward and one backward to the input."""
        inputs = self.x.detach().requires_grad_(True)
        result: dict[str, Tensor] = {}

        def forward() -> None:
            result["output"] = self.model(inputs)

        self.forward_ms.append(elapsed_ms(forward, device))
        self.backward_ms.append(
            elapsed_ms(lambda: torch.autograd.grad(result["output"], inputs, self.relevance), device)
        )

    def backward_flops(self) -> int:
        """The FLOPs of one backward (one forward before it, not counted)."""
        inputs = self.x.detach().requires_grad_(True)
        output = self.model(inputs)
        return count_flops(lambda: torch.autograd.grad(output, inputs, self.relevance))


def _inputs(case: LayerCase, batch: int, device: str) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (batch, *case.input_shape)
    nonnegative = torch.rand(shape, generator=generator)
    signed = torch.randn(shape, generator=generator)
    return {">=0": nonnegative.to(device), "signed": signed.to(device), "any": nonnegative.to(device)}


def _relevance(layer: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        output = layer(x)
    generator = torch.Generator().manual_seed(2)
    return output.clamp(min=0) * torch.rand(output.shape, generator=generator).to(output)


def measure_layer(case: LayerCase, batch: int, options: BenchOptions) -> list[dict[str, Any]]:
    """Time the plain gradient and every rule on one layer; one row per (rule, input)."""
    from lrpkit import types
    from lrpkit.composites import LayerMapComposite, layer_map_base

    assert options.repeats is not None and options.warmup is not None
    device = options.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        layer = case.make().to(device).eval()
    inputs = _inputs(case, batch, device)
    relevances = {kind: _relevance(layer, x) for kind, x in inputs.items()}
    plain = nn.Sequential(layer, nn.ReLU())
    participants = [Participant("gradient", ">=0", plain, inputs[">=0"], relevances[">=0"], [], [])]
    with ExitStack() as stack:
        stack.enter_context(frozen_parameters(layer))
        for rule, factory in rule_factories().items():
            for kind in input_kinds(rule):
                model = nn.Sequential(copy.deepcopy(layer), nn.ReLU())
                composite = LayerMapComposite(layer_map_base() + [(types.AnyLinear, factory())], canonizers=[])
                stack.enter_context(composite.context(model))
                participants.append(Participant(rule, kind, model, inputs[kind], relevances[kind], [], []))
        for _ in range(options.warmup):
            for participant in participants:
                participant.step(device)
        for participant in participants:
            participant.forward_ms.clear()
            participant.backward_ms.clear()
        for _ in range(options.repeats):
            for participant in participants:
                participant.step(device)
        with torch.no_grad():
            layer_flops = count_flops(lambda: layer(inputs[">=0"]))
        counted = [ratio(float(participant.backward_flops()), float(layer_flops)) for participant in participants]
    return _rows(case, batch, participants, counted)


def _rows(case: LayerCase, batch: int, participants: list[Participant], counted: list[float | None]) -> list[dict[str, Any]]:
    """One row per rule; ``counted``: the layer products each participant's backward ran."""
    plain = participants[0]
    plain_backward, plain_forward = median(plain.backward_ms), median(plain.forward_ms)
    rows = []
    for participant, products in zip(participants[1:], counted[1:]):
        floor = FLOORS[(participant.rule, participant.kind)]
        backward = median(participant.backward_ms)
        time_ratio = ratio(backward, plain_backward)
        rows.append({
            "layer": case.name,
            "batch": batch,
            "rule": participant.rule,
            "input": participant.kind,
            "gradient_ms": plain_backward,
            "rule_ms": backward,
            "ratio_vs_gradient": time_ratio,
            "floor_products": floor.products,
            "products_counted": products,
            "ratio_over_floor": ratio(time_ratio, float(floor.products)),
            "algebraic_min_products": floor.minimum,
            "forward_ratio": ratio(median(participant.forward_ms), plain_forward),
            "floor_note": floor.note,
            "times_ms": [round(value, 4) for value in participant.backward_ms],
            "gradient_times_ms": [round(value, 4) for value in plain.backward_ms],
        })
    return rows


def run(options: BenchOptions) -> dict[str, Any]:
    """The rule-cost suite: one row per (layer, batch, rule, input)."""
    options = options.resolved(**(QUICK_DEFAULTS if options.quick else DEFAULTS))
    assert options.batches is not None
    rows: list[dict[str, Any]] = []
    for batch in options.batches:
        for case in layer_cases(options.quick):
            print(f"[rules] {case.name}, batch {batch}, {options.device}", file=sys.stderr, flush=True)
            rows.extend(measure_layer(case, batch, options))
    return {
        "suite": "rules",
        "options": options.as_dict(),
        "notes": [
            "backward time of the rule / backward time of the plain layer (input gradient only, "
            "parameters frozen); median of the repeats, interleaved across rules",
            "relevance at the ReLU's output: relu(z) * uniform[0, 1]",
            "each layer is followed by a ReLU, which passes the relevance on (and lends the rule its output)",
            "floor: layer-sized products (forwards + transposed products) the rule's formulation "
            "needs; plain gradient = 1; counted: the backward's FLOPs over the layer's forward FLOPs, "
            "in one more untimed call",
            "forward x plain: the forward with the rule's hook attached / the plain forward",
        ],
        "rows": rows,
    }
