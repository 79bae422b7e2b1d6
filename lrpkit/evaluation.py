"""Evaluate explanations: conservation, pixel flipping / region perturbation, randomisation.

Three independent checks of an explanation:

- :func:`conservation` tabulates how much relevance is left at each recorded layer and at the
  input, relative to the relevance that started at the output (for conservative rules the
  ratios stay close to 1).
- :func:`perturbation_curve`, :func:`aopc` and :func:`abpc` measure *faithfulness*: remove
  input regions in the order the relevance gives (most relevant first, MoRF, or least relevant
  first, LeRF) and record how the target score falls (Samek et al. 2017; Blücher et al. 2024).
- :func:`randomisation_check` is the model-parameter randomisation test of Adebayo et al.
  (2018): an explanation that depends on what the model has learned must change when the
  model's parameters are replaced by random ones.

References
----------
.. [1] W. Samek, A. Binder, G. Montavon, S. Lapuschkin, K.-R. Müller, "Evaluating the
   visualization of what a deep neural network has learned", IEEE Transactions on Neural
   Networks and Learning Systems 28(11), 2017.
.. [2] S. Blücher, J. Vielhaben, N. Strodthoff, "Decoupling pixel flipping and occlusion
   strategy for consistent XAI benchmarks", Transactions on Machine Learning Research, 2024.
.. [3] J. Adebayo, J. Gilmer, M. Muelly, I. Goodfellow, M. Hardt, B. Kim, "Sanity checks for
   saliency maps", NeurIPS 2018.

Examples
--------
>>> import torch
>>> from lrpkit import composites, evaluation
>>> from lrpkit.attribution import Gradient
>>> torch.manual_seed(0)  # doctest: +ELLIPSIS
<torch._C.Generator object at ...>
>>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
...                             torch.nn.Linear(8, 3)).eval()
>>> x = torch.rand(2, 1, 4, 4)
>>> result = Gradient(model, composites.EpsilonPlus())(x, target=0)
>>> curve = evaluation.perturbation_curve(model, x, result.relevance, target=0)
>>> curve.scores.shape  # 2 samples, the unperturbed input and 16 pixels removed one by one
torch.Size([2, 17])
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from .attribution import Attribution, OutputSelector, class_indices, select_output
from .progress import Progress
from .tokens import is_token_ids
from .report import format_table

__all__ = [
    "ConservationReport",
    "ConservationRow",
    "PerturbationCurve",
    "RandomisationResult",
    "abpc",
    "aopc",
    "conservation",
    "perturbation_curve",
    "plot_curves",
    "randomisation_check",
    "spearman",
    "ssim_lite",
]

ClassTarget = Union[None, int, Sequence[int], Tensor]
Order = Literal["morf", "lerf"]
Fill = Union[Literal["mean", "zero", "uniform"], float, Tensor]
Reduction = Literal["mean", "none"]
Similarity = Union[Literal["spearman", "ssim-lite"], Callable[[Tensor, Tensor], Tensor]]

#: Row names of the starting relevance and of the input relevance in a conservation report.
START_ROW = "(output)"
INPUT_ROW = "(input)"

# ================================================================================ conservation


@dataclass(frozen=True)
class ConservationRow:
    """The relevance at one place of the backward pass.

    Attributes
    ----------
    name
        ``"(output)"`` for the starting relevance, ``"(input)"`` for the input relevance, else
        the recorded module or captured call (its relevance *at its input*).
    sums
        Relevance summed per sample, shape ``(batch,)``, float64.
    ratio
        ``sums`` divided by the starting relevance's sums, shape ``(batch,)``; ``inf`` or
        ``nan`` for a sample whose starting relevance sums to zero.
    """

    name: str
    sums: Tensor
    ratio: Tensor

    @property
    def deviation(self) -> Tensor:
        """``|ratio - 1|`` per sample."""
        return (self.ratio - 1).abs()


@dataclass(frozen=True)
class ConservationReport:
    """Per-layer relevance sums of one explanation; ``print()`` it for an aligned table.

    Rows follow the relevance from the output down to the input: the starting relevance
    (``"(output)"``), the recorded layers from the last to the first in forward order, and the
    input relevance (``"(input)"``). In a chain of layers every ratio is close to 1 for
    conservative rules; where the graph branches (a residual block) a layer on one branch
    gets only that branch's share, and the ratios sum to 1 again where the branches meet.
    """

    rows: tuple[ConservationRow, ...]

    def __iter__(self) -> Iterator[ConservationRow]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> ConservationRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no row named {name!r}; rows: {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        """The row names, from the output down to the input."""
        return [row.name for row in self.rows]

    @property
    def start(self) -> Tensor:
        """The starting relevance summed per sample, shape ``(batch,)``."""
        return self.rows[0].sums

    @property
    def max_deviation(self) -> float:
        """The largest ``|ratio - 1|`` over all rows and samples (``nan`` if any ratio is)."""
        deviations = torch.stack([row.deviation for row in self.rows[1:]])
        return float(deviations.max())

    def __str__(self) -> str:
        return _conservation_table(self)


def conservation(result: Attribution, merge_inputs: bool = True) -> ConservationReport:
    """How much relevance each recorded layer and the input keep of the starting relevance.

    LRP rules such as LRP-0, epsilon (small epsilon, no bias) and z+ are conservative: each
    layer hands on the relevance it receives (Bach et al. 2015; Montavon et al. 2019), so the
    per-sample sums stay equal to the starting relevance (for a class target, the target
    logit). Biases, the epsilon stabiliser, dead units and rules such as z+ on signed outputs
    absorb some; this table shows where.

    Parameters
    ----------
    result
        An :class:`~lrpkit.attribution.Attribution` with ``start`` set (every attributor sets
        it). Layers appear when it was made with ``record=...`` (``result.intermediate``);
        otherwise the table has the starting relevance and the input only. An intermediate
        entry that is a tuple or list of tensors is summed over its tensors.
    merge_inputs
        Sum the entries ``name[0]``, ``name[1]``, ... that ``record`` makes for the inputs of
        one call with several inputs (``x + y``) into one row ``name``: the relevance that
        call hands on, which a conservative rule keeps equal to what it receives.

    Returns
    -------
    ConservationReport
        ``.rows`` (name, per-sample sums, ratio to the start), ``.max_deviation``; ``str()``
        gives an aligned table.

    Raises
    ------
    ValueError
        If ``result.start`` is ``None``, or an entry's batch size differs from the start's.
    TypeError
        If an intermediate entry is not a tensor or a sequence of tensors.

    Examples
    --------
    >>> import torch
    >>> from lrpkit.attribution import Attribution
    >>> result = Attribution(output=torch.tensor([[2.0, 1.0]]), relevance=torch.tensor([[1.5, 0.4]]),
    ...                      intermediate={"fc": torch.tensor([[1.0, 1.0]])},
    ...                      start=torch.tensor([[2.0, 0.0]]))
    >>> report = conservation(result)
    >>> report.names
    ['(output)', 'fc', '(input)']
    >>> report["(input)"].ratio
    tensor([0.9500], dtype=torch.float64)
    >>> round(report.max_deviation, 6)
    0.05
    """
    if result.start is None:
        raise ValueError(
            "result.start is None: conservation needs the relevance that started the backward "
            "pass; use an Attribution returned by an attributor such as Gradient"
        )
    start = _per_sample_sums(result.start, START_ROW, batch=None)
    batch = len(start)
    layers: dict[str, Tensor] = {}
    for name, relevance in result.intermediate.items():
        total = _per_sample_sums(relevance, f"result.intermediate[{name!r}]", batch)
        row = _call_of_input(name) if merge_inputs else name
        layers[row] = layers[row] + total if row in layers else total
    sums = [(START_ROW, start), *reversed(layers.items())]
    sums.append((INPUT_ROW, _per_sample_sums(result.relevance, "result.relevance", batch)))
    return ConservationReport(tuple(ConservationRow(name, total, total / start) for name, total in sums))


def _call_of_input(name: str) -> str:
    """``'layer1.0.add[1]'`` -> ``'layer1.0.add'``: the call an input entry belongs to."""
    match = re.fullmatch(r"(.+)\[[^\[\]]+\]", name)
    return match.group(1) if match else name


def _per_sample_sums(relevance: Any, what: str, batch: int | None) -> Tensor:
    """Sum a relevance tensor (or a sequence of them) over every dimension but the first."""
    if isinstance(relevance, (tuple, list)):
        if not relevance:
            raise TypeError(f"{what} is an empty {type(relevance).__name__}; expected tensors")
        parts = [_per_sample_sums(part, what, batch) for part in relevance]
        return torch.stack(parts).sum(0)
    if not isinstance(relevance, Tensor):
        raise TypeError(f"{what} must be a tensor (or a sequence of tensors), got {type(relevance).__name__}")
    if relevance.ndim == 0:
        raise ValueError(f"{what} is a scalar; expected a tensor with a batch dimension first")
    if batch is not None and relevance.shape[0] != batch:
        raise ValueError(
            f"{what} has shape {tuple(relevance.shape)}, batch size {relevance.shape[0]}, but the "
            f"starting relevance has batch size {batch}"
        )
    return relevance.detach().reshape(relevance.shape[0], -1).double().sum(1)


def _conservation_table(report: ConservationReport, max_samples: int = 4) -> str:
    batch = len(report.start)
    shown = min(batch, max_samples)
    more = f" (sums of the first {shown} shown)" if batch > shown else ""
    title = f"relevance conservation, {batch} sample{'s' if batch != 1 else ''}{more}: sums and ratio to the start"
    header = ("layer", *(f"sum[{index}]" for index in range(shown)), "ratio min", "ratio max")
    lines = [
        (
            row.name,
            *(f"{value:.6g}" for value in row.sums[:shown].tolist()),
            f"{float(row.ratio.min()):.6f}",
            f"{float(row.ratio.max()):.6f}",
        )
        for row in report.rows
    ]
    footer = f"max |ratio - 1|: {report.max_deviation:.3g}"
    return "\n".join([title, format_table(header, lines, numbers_right=True), footer])


# ========================================================================= region perturbation


@dataclass(frozen=True)
class PerturbationCurve:
    """The target score while more and more input regions are removed.

    Attributes
    ----------
    fractions
        Fraction of the regions removed at each step, shape ``(steps + 1,)``, starting at 0
        (the unperturbed input); float64 on the CPU.
    scores
        The target's output (logit) per sample and step, shape ``(batch, steps + 1)``.
    targets
        The class explained per sample, shape ``(batch,)`` (fixed before the first removal).
    order
        ``"morf"`` (most relevant first) or ``"lerf"`` (least relevant first).
    region
        The size of one region (one entry per spatial dimension).
    n_regions
        How many regions the input is divided into.
    """

    fractions: Tensor
    scores: Tensor
    targets: Tensor
    order: str
    region: tuple[int, ...]
    n_regions: int

    @property
    def mean(self) -> Tensor:
        """The curve averaged over the samples, shape ``(steps + 1,)``."""
        return self.scores.mean(0)

    @property
    def drop(self) -> Tensor:
        """``f(x_0) - f(x_k)`` per sample and step: how far the score has fallen."""
        return self.scores[:, :1] - self.scores

    @property
    def steps(self) -> int:
        """The number of perturbation steps (not counting the unperturbed input)."""
        return len(self.fractions) - 1


def plot_curves(
    curves: Mapping[str, PerturbationCurve],
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    ax: Any = None,
) -> Any:
    """Plot the mean score of labelled perturbation curves against the fraction removed.

    Needs matplotlib (``pip install matplotlib``, or lrpkit's ``plot`` extra); everything else
    in lrpkit works without it.

    Parameters
    ----------
    curves
        ``{label: curve}``, e.g. ``{"LRP, MoRF": morf, "gradient, MoRF": ...}``.
    path
        Where to save the figure (any format matplotlib knows, from the suffix); ``None``: don't.
    title
        The axes' title.
    ax
        A matplotlib ``Axes`` to draw into; ``None``: a new figure.

    Returns
    -------
    matplotlib.figure.Figure
        The figure drawn into.

    Raises
    ------
    ImportError
        If matplotlib is not installed (the message says how to install it).

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    >>> x = torch.rand(3, 1, 2, 2)
    >>> curve = perturbation_curve(model, x, x, target=0)
    >>> figure = plot_curves({"input as relevance": curve})  # doctest: +SKIP
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "plot_curves needs matplotlib: pip install matplotlib (or lrpkit[plot]); the curves "
            "themselves (curve.fractions, curve.mean) need no plotting library"
        ) from None
    if not curves:
        raise ValueError("plot_curves needs at least one curve: pass {label: curve}")
    figure = plt.figure(figsize=(5, 3.5)) if ax is None else ax.figure
    axes = figure.add_subplot(1, 1, 1) if ax is None else ax
    for label, curve in curves.items():
        if not isinstance(curve, PerturbationCurve):
            raise TypeError(f"curve {label!r} is a {type(curve).__name__}, not a PerturbationCurve")
        axes.plot(curve.fractions.numpy(), curve.mean.detach().cpu().double().numpy(), label=label)
    axes.set_xlabel("fraction of regions removed")
    axes.set_ylabel("target score (mean over samples)")
    if title:
        axes.set_title(title)
    axes.legend()
    if path is not None:
        figure.savefig(path, bbox_inches="tight")
    return figure


def perturbation_curve(
    model: nn.Module,
    x: Tensor,
    relevance: Tensor,
    target: ClassTarget = None,
    order: Order = "morf",
    region: int | Sequence[int] = 1,
    steps: int | None = None,
    fill: Fill = "mean",
    *,
    max_fraction: float = 1.0,
    batch_size: int = 64,
    output: OutputSelector = None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> PerturbationCurve:
    """Pixel flipping / region perturbation: remove regions by relevance, record the score.

    The input's spatial dimensions are cut into non-overlapping regions of size ``region``
    (edge regions are smaller when a size does not divide the input). Each region's relevance
    is the sum of ``relevance`` over its pixels and over all channels. Regions are removed
    (replaced by ``fill`` in every channel) in order of decreasing (``"morf"``) or increasing
    (``"lerf"``) relevance, ties broken by region index (row-major), and the model's output for
    the target class is recorded after each step (Samek et al. 2017).

    Parameters
    ----------
    model
        The classifier, in ``eval()`` mode, on ``x``'s device. It is only run (under
        ``torch.no_grad()``), never changed.
    x
        Inputs shaped ``(batch, channels, *spatial)`` (images: ``(batch, channels, height,
        width)``), or ``(batch, features)`` where every feature is a region; or token ids
        ``(batch, tokens)``, each token a region (word deletion, as in Arras et al. 2017: give
        ``fill`` the id that replaces a removed token).
    relevance
        The explanation to evaluate, shaped like ``x``.
    target
        The class whose score is recorded: ``None`` (the predicted class of the unperturbed
        input), an int, or one int per sample (a sequence or a 1-D tensor).
    order
        ``"morf"``: most relevant region first; ``"lerf"``: least relevant first.
    region
        Region size: an int (the same in every spatial dimension; 1 = single pixels) or one
        size per spatial dimension, e.g. ``(2, 2)``.
    steps
        Number of perturbation steps. ``None``: one region per step. Otherwise the number of
        removed regions grows in ``steps`` (nearly) equal increments.
    fill
        What a removed region is replaced with: ``"mean"`` (the sample's per-channel mean),
        ``"zero"``, a float, ``"uniform"`` (noise drawn uniformly between the sample's minimum
        and maximum, once per call, with ``generator``; the choice of Samek et al.), or a
        tensor broadcastable to ``x`` (a baseline image). For token ids: an int token id (or a
        tensor of ids); ``"zero"`` is id 0.
    max_fraction
        Stop when this fraction of the regions is removed (in ``(0, 1]``); Samek et al. remove
        the first 100 of many regions.
    batch_size
        Perturbed inputs per forward pass; the result does not depend on it (up to the
        model's own floating-point batch effects).
    output
        For models returning a tuple or dict: which entry is the class score (as in
        :class:`~lrpkit.attribution.Gradient`).
    generator
        Random numbers for ``fill="uniform"`` (``None``: torch's global generator).
    progress
        Draw a progress bar on stderr: ``True``, ``False``, or ``None`` (only when stderr is a
        terminal and the run takes more than a second).

    Returns
    -------
    PerturbationCurve
        ``.fractions``, ``.scores`` (batch, steps + 1), ``.mean``, ``.targets``.

    Raises
    ------
    ValueError
        If ``relevance`` is not shaped like ``x``, contains NaN, or an argument is out of range.

    Examples
    --------
    A linear model whose score is ``x . w``: removing pixels (fill 0) most relevant first
    lowers the score by the largest contribution first.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[1].weight.copy_(torch.tensor([[1.0, 4.0, 2.0, 3.0]]))
    >>> x = torch.ones(1, 1, 2, 2)
    >>> relevance = x * model[1].weight.view(1, 1, 2, 2)      # gradient x input
    >>> curve = perturbation_curve(model, x, relevance, target=0, fill="zero")
    >>> curve.scores
    tensor([[10.,  6.,  3.,  1.,  0.]])
    >>> curve.fractions
    tensor([0.0000, 0.2500, 0.5000, 0.7500, 1.0000], dtype=torch.float64)
    """
    _check_pair(x, relevance)
    _check_positive_int(batch_size, "batch_size")
    grid = _Grid.of(x, region)
    removal_order = _removal_ranks(grid.region_relevance(relevance.detach().to(x.device)), _check_order(order))
    pixel_ranks = grid.pixel_ranks(removal_order)
    counts = _removal_counts(grid.n_regions, steps, max_fraction)
    baseline = grid.view(_baseline(x, fill, generator))
    with torch.no_grad():
        scores, targets = _scores(model, grid.view(x), baseline, pixel_ranks, counts, target, x.shape,
                                  batch_size, output, progress)
    return PerturbationCurve(
        fractions=counts.double() / grid.n_regions,
        scores=scores,
        targets=targets,
        order=order,
        region=grid.region,
        n_regions=grid.n_regions,
    )


def aopc(curve: PerturbationCurve, reduction: Reduction = "mean") -> Tensor:
    """Area over the perturbation curve (AOPC), Samek et al. 2017.

    ``AOPC = 1 / (L + 1) * sum_{k=0..L} (f(x_0) - f(x_k))``: the mean, over the unperturbed
    input and the ``L`` steps, of how far the target score has fallen, averaged over the
    samples. On a MoRF curve, higher is better (the relevance found what the model needs
    first); on a LeRF curve, lower is better.

    Parameters
    ----------
    curve
        A curve from :func:`perturbation_curve` (usually ``order="morf"``).
    reduction
        ``"mean"``: a scalar averaged over the samples; ``"none"``: one value per sample.

    Returns
    -------
    Tensor
        A 0-dim tensor, or shape ``(batch,)`` for ``reduction="none"``.

    Examples
    --------
    >>> curve = PerturbationCurve(fractions=torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64),
    ...                           scores=torch.tensor([[4.0, 1.0, 1.0], [2.0, 2.0, 2.0]]),
    ...                           targets=torch.tensor([0, 0]), order="morf", region=(1,), n_regions=2)
    >>> aopc(curve, reduction="none")           # (0 + 3 + 3) / 3 and (0 + 0 + 0) / 3
    tensor([2., 0.])
    >>> aopc(curve)
    tensor(1.)
    """
    return _reduce(curve.drop.mean(1), reduction)


def abpc(
    model: nn.Module,
    x: Tensor,
    relevance: Tensor,
    target: ClassTarget = None,
    region: int | Sequence[int] = 1,
    steps: int | None = None,
    fill: Fill = "mean",
    *,
    max_fraction: float = 1.0,
    batch_size: int = 64,
    output: OutputSelector = None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """Area between the LeRF and the MoRF perturbation curves (ABPC).

    ``ABPC = 1 / (L + 1) * sum_{k=0..L} (f(x_k^LeRF) - f(x_k^MoRF))``: large when removing the
    most relevant regions hurts the score much more than removing the least relevant ones.
    Blücher et al. (2024) show that MoRF and LeRF alone can rank attribution methods in
    opposite ways depending on the occlusion strategy (``fill``), and that combining both
    curves into their difference (their *symmetric relevance gain*) gives rankings that agree
    across occlusion strategies.

    The arguments are those of :func:`perturbation_curve` (without ``order``). Both curves use
    the same targets and the same fill values (one draw of ``"uniform"`` noise).

    Returns
    -------
    Tensor
        A 0-dim tensor averaged over the samples, or shape ``(batch,)`` for
        ``reduction="none"``. The same as ``(lerf.scores - morf.scores).mean(1)`` of the two
        curves.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1, bias=False))
    >>> with torch.no_grad():
    ...     _ = model[1].weight.copy_(torch.tensor([[1.0, 4.0, 2.0, 3.0]]))
    >>> x = torch.ones(1, 1, 2, 2)
    >>> relevance = x * model[1].weight.view(1, 1, 2, 2)
    >>> abpc(model, x, relevance, target=0, fill="zero")   # LeRF 10 9 7 4 0, MoRF 10 6 3 1 0
    tensor(2.)
    """
    _check_pair(x, relevance)
    options: dict[str, Any] = dict(
        target=target, region=region, steps=steps, fill=_baseline(x, fill, generator),
        max_fraction=max_fraction, batch_size=batch_size, output=output, progress=progress,
    )
    morf = perturbation_curve(model, x, relevance, order="morf", **options)
    options["target"] = morf.targets
    lerf = perturbation_curve(model, x, relevance, order="lerf", **options)
    return _reduce((lerf.scores - morf.scores).mean(1), reduction)


def _check_pair(x: Tensor, relevance: Tensor) -> None:
    """Raise a clear error unless ``x`` is a floating batch and ``relevance`` is shaped like it."""
    for value, name in ((x, "x"), (relevance, "relevance")):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if x.ndim < 2:
        raise ValueError(f"x must have a batch dimension and at least one more, got shape {tuple(x.shape)}")
    if not x.is_floating_point() and not is_token_ids(x):
        raise TypeError(f"x must be a floating-point tensor (or integer token ids), got dtype {x.dtype}")
    if not relevance.is_floating_point():
        raise TypeError(f"relevance must be a floating-point tensor, got dtype {relevance.dtype}")
    if relevance.shape != x.shape:
        raise ValueError(
            f"relevance has shape {tuple(relevance.shape)} but x has shape {tuple(x.shape)}; "
            "pass the relevance of this very input (e.g. Gradient(model, composite)(x).relevance)"
        )
    if bool(torch.isnan(relevance).any()):
        raise ValueError("relevance contains NaN; regions cannot be ranked")


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_order(order: str) -> bool:
    """``True`` for most-relevant-first."""
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' (most relevant first) or 'lerf' (least relevant first), got {order!r}")
    return order == "morf"


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


@dataclass(frozen=True)
class _Grid:
    """Non-overlapping regions over the spatial dimensions of a ``(batch, channels, *spatial)`` input."""

    shape: tuple[int, ...]  # the input as (batch, channels, *spatial)
    region: tuple[int, ...]

    @classmethod
    def of(cls, x: Tensor, region: int | Sequence[int]) -> _Grid:
        shape = (x.shape[0], 1, x.shape[1]) if x.ndim == 2 else tuple(x.shape)
        spatial = shape[2:]
        if isinstance(region, bool) or not isinstance(region, (int, Sequence)):
            raise TypeError(f"region must be an int or a tuple of ints, got {type(region).__name__}")
        sizes = (region,) * len(spatial) if isinstance(region, int) else tuple(region)
        if len(sizes) != len(spatial) or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(
                f"region={region!r} does not fit an input with spatial shape {tuple(spatial)}: give one "
                f"positive int, or {len(spatial)} of them (one per spatial dimension)"
            )
        if any(size > extent for size, extent in zip(sizes, spatial)):
            raise ValueError(f"region={region!r} is larger than the input's spatial shape {tuple(spatial)}")
        return cls(shape=shape, region=sizes)

    @property
    def spatial(self) -> tuple[int, ...]:
        return self.shape[2:]

    @property
    def tiles(self) -> tuple[int, ...]:
        """Regions per spatial dimension."""
        return tuple(math.ceil(extent / size) for extent, size in zip(self.spatial, self.region))

    @property
    def n_regions(self) -> int:
        return math.prod(self.tiles)

    def view(self, tensor: Tensor) -> Tensor:
        return tensor.reshape(self.shape)

    def region_relevance(self, relevance: Tensor) -> Tensor:
        """Relevance summed over channels and over each region, ``(batch, n_regions)``, float64."""
        maps = self.view(relevance).double().sum(1)
        padding: list[int] = []
        for extent, size, count in zip(reversed(self.spatial), reversed(self.region), reversed(self.tiles)):
            padding += [0, count * size - extent]
        maps = torch.nn.functional.pad(maps, padding)
        split = [self.shape[0]]
        for count, size in zip(self.tiles, self.region):
            split += [count, size]
        within = tuple(range(2, 2 * len(self.tiles) + 1, 2))
        return maps.reshape(split).sum(dim=within).reshape(self.shape[0], -1)

    def pixel_region(self, device: torch.device) -> Tensor:
        """The (row-major) region index of each spatial position, shaped like the spatial dims."""
        index = torch.zeros((), dtype=torch.long, device=device)
        for axis, (extent, size, count) in enumerate(zip(self.spatial, self.region, self.tiles)):
            along = torch.arange(extent, device=device) // size
            index = index.unsqueeze(-1) * count + along.view(*([1] * axis), extent)
        return index

    def pixel_ranks(self, region_ranks: Tensor) -> Tensor:
        """Each pixel's position in the removal order, ``(batch, 1, *spatial)``."""
        regions = self.pixel_region(region_ranks.device).flatten()
        ranks = region_ranks[:, regions]
        return ranks.view(self.shape[0], 1, *self.spatial)


def _removal_ranks(region_relevance: Tensor, most_relevant_first: bool) -> Tensor:
    """Position of each region in the removal order; ties keep the region index order."""
    order = torch.sort(region_relevance, dim=1, descending=most_relevant_first, stable=True).indices
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _removal_counts(n_regions: int, steps: int | None, max_fraction: float) -> Tensor:
    """How many regions are removed at each step, starting with 0."""
    if isinstance(max_fraction, bool) or not isinstance(max_fraction, (int, float)) or not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must lie in (0, 1], got {max_fraction!r}")
    last = max(1, round(max_fraction * n_regions))
    if steps is None:
        return torch.arange(last + 1)
    _check_positive_int(steps, "steps")
    if steps > last:
        raise ValueError(
            f"steps={steps} is more than the {last} regions to remove (of {n_regions}); "
            "use steps=None for one region per step"
        )
    return torch.linspace(0, last, steps + 1, dtype=torch.float64).round().long()


def _baseline(x: Tensor, fill: Fill, generator: torch.Generator | None) -> Tensor:
    """The values removed regions take, shaped like ``x``."""
    if is_token_ids(x):
        return _token_baseline(x, fill)
    if isinstance(fill, Tensor):
        try:
            return torch.broadcast_to(fill.to(x), x.shape)
        except RuntimeError:
            raise ValueError(f"a tensor fill of shape {tuple(fill.shape)} does not broadcast to x's shape {tuple(x.shape)}") from None
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        return torch.full_like(x, float(fill))
    if fill == "zero":
        return torch.zeros_like(x)
    samples = x.reshape(x.shape[0], x.shape[1] if x.ndim > 2 else 1, -1)
    if fill == "mean":
        return samples.mean(-1, keepdim=True).expand_as(samples).reshape(x.shape)
    if fill == "uniform":
        low = x.reshape(x.shape[0], -1).min(1).values.view(-1, *([1] * (x.ndim - 1)))
        high = x.reshape(x.shape[0], -1).max(1).values.view(-1, *([1] * (x.ndim - 1)))
        device = generator.device if generator is not None else x.device
        noise = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
        return low + noise * (high - low)
    raise ValueError(f"fill must be 'mean', 'zero', 'uniform', a float or a tensor, got {fill!r}")


def _token_baseline(ids: Tensor, fill: Fill) -> Tensor:
    """The token id removed tokens take: ``fill`` must be one (an int, ``"zero"``, or a tensor of ids)."""
    if isinstance(fill, Tensor) and not fill.is_floating_point() and fill.dtype != torch.bool:
        try:
            return torch.broadcast_to(fill.to(ids), ids.shape)
        except RuntimeError:
            raise ValueError(f"a tensor fill of shape {tuple(fill.shape)} does not broadcast to x's shape {tuple(ids.shape)}") from None
    if fill == "zero" or (isinstance(fill, (int, float)) and not isinstance(fill, bool) and float(fill).is_integer()):
        return torch.full_like(ids, 0 if fill == "zero" else int(fill))
    raise ValueError(
        f"fill={fill!r}: x holds token ids, so a removed token must become a token id: give fill=<id> "
        "(the tokenizer's pad, unk or mask id), or a tensor of ids"
    )


def _scores(
    model: nn.Module,
    x: Tensor,
    baseline: Tensor,
    pixel_ranks: Tensor,
    counts: Tensor,
    target: ClassTarget,
    input_shape: torch.Size,
    batch_size: int,
    output: OutputSelector,
    progress: bool | None,
) -> tuple[Tensor, Tensor]:
    """Target scores ``(batch, steps + 1)`` and the targets, all steps batched in chunks."""
    batch, n_steps = x.shape[0], len(counts) - 1
    sample = torch.arange(batch, device=x.device).repeat_interleave(n_steps)
    step = torch.arange(1, n_steps + 1, device=x.device).repeat(batch)
    counts = counts.to(x.device)
    unperturbed = _chunks(batch, batch_size)
    perturbed = _chunks(len(sample), batch_size)

    def run(inputs: Tensor) -> Tensor:
        selected = select_output(model(inputs.reshape(-1, *input_shape[1:])), output)
        if selected.ndim < 2:
            raise ValueError(f"the model's output has shape {tuple(selected.shape)}; expected (batch, classes, ...)")
        return selected

    with Progress("perturbation", len(unperturbed) + len(perturbed), progress) as bar:
        outputs = []
        for chunk in unperturbed:
            outputs.append(run(x[chunk]))
            bar.step()
        first = torch.cat(outputs)
        targets = class_indices(first, target)
        scores = [_pick(first, targets)]
        for chunk in perturbed:
            n, k = sample[chunk], step[chunk]
            removed = pixel_ranks[n] < counts[k].view(-1, *([1] * (x.ndim - 1)))
            scores.append(_pick(run(torch.where(removed, baseline[n], x[n])), targets[n]))
            bar.step()
    start, *rest = scores
    steps = torch.cat(rest).to(start).view(batch, n_steps) if rest else start.new_zeros(batch, 0)
    return torch.cat([start.unsqueeze(1), steps], dim=1), targets


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(begin, min(begin + size, total)) for begin in range(0, total, size)]


def _pick(output: Tensor, classes: Tensor) -> Tensor:
    """The output of each sample's class (summed over any further dimensions)."""
    picked = output[torch.arange(len(output), device=output.device), classes.to(output.device)]
    return picked.reshape(len(output), -1).sum(1)


# ================================================================================ randomisation


@dataclass(frozen=True)
class RandomisationResult:
    """Similarity of the original heatmaps to those of a model with randomised parameters.

    Attributes
    ----------
    layers
        The module randomised at each step. With ``cascade=True`` step ``i`` has every module
        up to ``layers[i]`` randomised, otherwise only ``layers[i]``.
    similarity
        Similarity per step and sample, shape ``(steps, batch)``.
    original
        The heatmaps of the trained model, shaped like the input.
    randomised
        The heatmaps after each step, shape ``(steps, *input shape)``.
    cascade
        Whether the randomisation was cumulative.
    """

    layers: tuple[str, ...]
    similarity: Tensor
    original: Tensor
    randomised: Tensor
    cascade: bool

    @property
    def mean(self) -> Tensor:
        """The similarity per step averaged over the samples (NaNs ignored), shape ``(steps,)``."""
        return self.similarity.nanmean(1)

    def __str__(self) -> str:
        kind = "cascading, top layer first" if self.cascade else "one layer at a time"
        title = f"randomisation check ({kind}), {self.similarity.shape[1]} samples"
        header = ("randomised" + (" up to" if self.cascade else ""), "mean", "min", "max")
        lines = [
            (name, f"{float(mean):.4f}", f"{float(row.min()):.4f}", f"{float(row.max()):.4f}")
            for name, mean, row in zip(self.layers, self.mean, self.similarity)
        ]
        return "\n".join([title, format_table(header, lines, numbers_right=True)])


def randomisation_check(
    model: nn.Module,
    x: Tensor,
    explain: Callable[..., Any],
    target: Any = None,
    layers: Literal["top-down"] | Sequence[str] = "top-down",
    similarity: Similarity = "spearman",
    *,
    cascade: bool = True,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> RandomisationResult:
    """Model-parameter randomisation test (Adebayo et al. 2018).

    A deep copy of ``model`` is explained, then its layers' parameters are replaced by random
    ones, from the top layer down (cascading), and after each layer the heatmaps are explained
    again and compared with the original ones. An explanation that reflects what the model has
    learned changes as soon as the learned parameters are gone; one that stays similar
    explains the input (an edge detector) rather than the model. ``model`` itself is never run
    or changed.

    Each parameter tensor is replaced by normal noise with the mean and standard deviation of
    the trained tensor (a re-initialisation that keeps each layer's scale); a constant tensor
    (a zero bias, an untrained norm's ones) therefore stays as it is. Buffers (BatchNorm
    statistics) are kept.

    Parameters
    ----------
    model
        The trained model.
    x
        An input batch on the model's device.
    explain
        Either an *attributor factory*, a callable of one required argument ``model`` that
        returns an attributor (``Gradient``, ``lambda m: Gradient(m, composite=...)``), or an
        *explain function* with at least two required arguments, called as
        ``explain(model, x, target=target)`` (``lrpkit.explain``). Either may return an
        :class:`~lrpkit.attribution.Attribution` or the relevance tensor.
    target
        What to explain (any target the explainer accepts). ``None``: the class the trained
        model predicts, kept fixed for the randomised models.
    layers
        ``"top-down"``: every module that owns parameters, in reverse order of execution (one
        extra forward pass finds it; a parameter of a module that never runs goes with the
        nearest ancestor that does, as ``out_proj`` of ``nn.MultiheadAttention``; parameters
        of the root module itself come last, as ``""``). Or a list of module names
        (``model.get_submodule`` paths), randomised in that order with all parameters below
        them.
    similarity
        ``"spearman"``: Spearman rank correlation of the absolute heatmaps (:func:`spearman`);
        ``"ssim-lite"``: a structural similarity of the absolute heatmaps (:func:`ssim_lite`);
        or a callable ``(original, randomised) -> Tensor`` of shape ``(batch,)`` that gets the
        heatmaps as they are.
    cascade
        ``True`` (the cascading test): randomisations accumulate. ``False``: one layer at a
        time on a fresh copy (the independent test).
    generator
        Random numbers for the new parameters (``None``: torch's global generator); on the
        CPU or on the model's device.
    progress
        Draw a progress bar on stderr, one step per explanation: ``True``, ``False``, or
        ``None`` (only when stderr is a terminal and the run takes more than a second).

    Returns
    -------
    RandomisationResult
        ``.layers``, ``.similarity`` (steps, batch), ``.mean``, the heatmaps; ``print()`` it for
        a table.

    Raises
    ------
    ValueError
        If a layer name is unknown or owns no parameters, or an explanation is not shaped like
        ``x``.
    TypeError
        If ``explain``'s signature fits neither form, or a similarity returns no ``(batch,)``
        tensor.

    Examples
    --------
    >>> import torch
    >>> from lrpkit import composites
    >>> from lrpkit.attribution import Gradient
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
    ...                             torch.nn.Linear(8, 3))
    >>> x = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    >>> check = randomisation_check(model, x, lambda m: Gradient(m, composites.EpsilonPlus()),
    ...                             generator=torch.Generator().manual_seed(0))
    >>> check.layers
    ('3', '1')
    >>> check.similarity.shape
    torch.Size([2, 2])
    """
    if not isinstance(x, Tensor) or not (x.is_floating_point() or is_token_ids(x)):
        raise TypeError("x must be a floating-point torch.Tensor (or integer token ids)")
    run = _explain_function(explain)
    compare = _similarity_function(similarity)
    working = copy.deepcopy(model)
    groups = _layers_to_randomise(working, x, layers)
    heatmaps: list[Tensor] = []
    similarities: list[Tensor] = []
    with Progress("randomisation", len(groups) + 1, progress, unit="explanations") as bar:
        result = run(working, x, target)
        original = _relevance_of(result, x, "the explanation of the trained model")
        fixed_target = _fixed_target(working, x, target, result)
        bar.step()
        for name, parameters in groups:
            if not cascade:
                working = copy.deepcopy(model)
            _randomise(working, parameters, generator)
            heatmap = _relevance_of(run(working, x, fixed_target), x, f"the explanation with {name!r} randomised")
            heatmaps.append(heatmap)
            similarities.append(_checked_similarity(compare(original, heatmap), len(x)))
            bar.step()
    return RandomisationResult(
        layers=tuple(name for name, _ in groups),
        similarity=torch.stack(similarities),
        original=original,
        randomised=torch.stack(heatmaps),
        cascade=cascade,
    )


def _explain_function(explain: Callable[..., Any]) -> Callable[[nn.Module, Tensor, Any], Any]:
    """``(model, x, target) -> result`` for an attributor factory or an explain function."""
    if not callable(explain):
        raise TypeError(f"explain must be callable, got {type(explain).__name__}")
    try:
        parameters = inspect.signature(explain).parameters.values()
    except (TypeError, ValueError):
        raise TypeError(
            "cannot read explain's signature; pass a lambda: `lambda model: Gradient(model, ...)` or "
            "`lambda model, x, target: ...`"
        ) from None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is inspect.Parameter.empty]
    if len(required) == 1:
        return lambda model, x, target: explain(model)(x, target=target)
    if len(required) >= 2:
        return lambda model, x, target: explain(model, x, target=target)
    raise TypeError(
        "explain must be an attributor factory `explain(model)` or an explain function "
        "`explain(model, x, target=...)`; its signature has no required positional argument"
    )


def _relevance_of(result: Any, x: Tensor, what: str) -> Tensor:
    relevance = result.relevance if isinstance(result, Attribution) else result
    if not isinstance(relevance, Tensor):
        raise TypeError(f"{what} is a {type(result).__name__}; expected an Attribution or a relevance tensor")
    if relevance.shape != x.shape:
        raise ValueError(f"{what} has shape {tuple(relevance.shape)} but x has shape {tuple(x.shape)}")
    return relevance.detach()


def _fixed_target(model: nn.Module, x: Tensor, target: Any, result: Any) -> Any:
    """``None`` becomes the trained model's predicted classes, so randomised models explain the same ones."""
    if target is not None:
        return target
    if isinstance(result, Attribution):
        output = result.output
    else:
        with torch.no_grad():
            output = model(x)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"the model returns a {type(output).__name__}; give target=... explicitly, or an explainer "
                "that returns an Attribution"
            )
    if output.ndim != 2:
        raise ValueError(f"target=None needs an output of shape (batch, classes), got {tuple(output.shape)}")
    return output.argmax(1)


def _layers_to_randomise(model: nn.Module, x: Tensor, layers: Any) -> list[tuple[str, list[str]]]:
    """``(layer name, names of the parameters randomised with it)`` in the order of randomisation."""
    if isinstance(layers, str):
        if layers != "top-down":
            raise ValueError(f"layers must be 'top-down' or a list of module names, got {layers!r}")
        groups = _parameters_by_executed_module(model, x)
        if not groups:
            raise ValueError("the model runs no module that owns parameters; nothing to randomise")
        return groups[::-1]
    names = list(layers)
    if not names:
        raise ValueError("layers is empty; give 'top-down' or at least one module name")
    owners = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    groups = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the model has no module {name!r}; modules with parameters: {', '.join(owners)}") from None
        parameters = [_join(name, parameter) for parameter, _ in module.named_parameters()]
        if not parameters:
            raise ValueError(f"module {name!r} has no parameters to randomise; modules with parameters: {', '.join(owners)}")
        groups.append((name, parameters))
    return groups


def _parameters_by_executed_module(model: nn.Module, x: Tensor) -> list[tuple[str, list[str]]]:
    """Parameters grouped by the module that runs them, in the order those modules first run on ``x``.

    A parameter belongs to its module if that module runs, else to the nearest ancestor that
    does (``nn.MultiheadAttention`` uses ``out_proj.weight`` without calling ``out_proj``).
    """
    order = _execution_order(model, x)
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        module = name.rpartition(".")[0]
        while module not in order and module:
            module = module.rpartition(".")[0]
        groups.setdefault(module, []).append(name)
    return [(module, groups[module]) for module in order if module in groups]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _execution_order(model: nn.Module, x: Tensor) -> list[str]:
    """Names of the model's modules (the root is ``""``) in the order they first run on ``x``."""
    order: dict[str, None] = {"": None}
    handles = []

    def seen(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            order.setdefault(name, None)
        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(seen(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return list(order)


def _randomise(model: nn.Module, names: list[str], generator: torch.Generator | None) -> None:
    """Replace each named parameter by normal noise with the parameter's own mean and standard deviation."""
    with torch.no_grad():
        for name in names:
            parameter = model.get_parameter(name)
            device = generator.device if generator is not None else parameter.device
            # float32 noise whatever the model's dtype: a float64 copy of a model gets the same draw
            noise = torch.randn(parameter.shape, generator=generator, device=device, dtype=torch.float32)
            values = parameter.double()
            mean, std = values.mean(), values.std(correction=0)
            parameter.copy_((noise.to(parameter.device).double() * std + mean).to(parameter.dtype))


def _similarity_function(similarity: Similarity) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(similarity):
        return similarity
    if similarity == "spearman":
        return lambda a, b: spearman(a.abs(), b.abs())
    if similarity == "ssim-lite":
        return lambda a, b: ssim_lite(a.abs(), b.abs())
    raise ValueError(f"similarity must be 'spearman', 'ssim-lite' or a callable, got {similarity!r}")


def _checked_similarity(values: Any, batch: int) -> Tensor:
    if not isinstance(values, Tensor) or values.shape != (batch,):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise TypeError(f"a similarity must return a tensor of shape ({batch},), one value per sample; got {shape}")
    return values.detach()


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation between ``a[i]`` and ``b[i]`` for each sample ``i``.

    The Pearson correlation of the ranks of the flattened values; tied values get the average
    of their ranks. ``nan`` for a sample where either input is constant.

    Parameters
    ----------
    a, b
        Tensors of the same shape ``(batch, ...)``.

    Returns
    -------
    Tensor
        Shape ``(batch,)``, float64, values in ``[-1, 1]``.

    Examples
    --------
    >>> spearman(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[10.0, 20.0, 25.0, 100.0]]))
    tensor([1.], dtype=torch.float64)
    >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]]))
    tensor([-1.], dtype=torch.float64)
    """
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"spearman needs two tensors of the same shape (batch, ...), got {tuple(a.shape)} and {tuple(b.shape)}")
    ranks_a = _average_ranks(a.detach().reshape(len(a), -1))
    ranks_b = _average_ranks(b.detach().reshape(len(b), -1))
    centred_a = ranks_a - ranks_a.mean(1, keepdim=True)
    centred_b = ranks_b - ranks_b.mean(1, keepdim=True)
    covariance = (centred_a * centred_b).sum(1)
    return covariance / (centred_a.square().sum(1) * centred_b.square().sum(1)).sqrt()


def _average_ranks(values: Tensor) -> Tensor:
    """Per row, the rank of each value (0-based, float64); ties share the mean of their ranks."""
    rows, width = values.shape
    ordered, order = torch.sort(values, dim=1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(1) - 1 + torch.arange(rows, device=values.device).unsqueeze(1) * width
    positions = torch.arange(width, device=values.device, dtype=torch.float64).expand(rows, width)
    totals = torch.zeros(rows * width, dtype=torch.float64, device=values.device)
    sizes = torch.zeros_like(totals)
    totals.scatter_add_(0, group.flatten(), positions.flatten())
    sizes.scatter_add_(0, group.flatten(), torch.ones_like(positions).flatten())
    mean_rank = (totals / sizes.clamp(min=1))[group]
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def ssim_lite(a: Tensor, b: Tensor, window: int = 7) -> Tensor:
    """A light structural similarity (SSIM) between ``a[i]`` and ``b[i]`` for each sample ``i``.

    Each sample is scaled to ``[0, 1]`` by its own minimum and maximum; SSIM (Wang et al. 2004,
    with ``C1 = 0.01^2``, ``C2 = 0.03^2``) is computed per channel over a uniform (not Gaussian)
    ``window x window`` sliding window, capped at the image size, and averaged. Inputs that are
    not ``(batch, channels, height, width)`` are compared with one global window. Adebayo et al.
    (2018) compare heatmaps with SSIM next to rank correlation.

    Parameters
    ----------
    a, b
        Tensors of the same shape ``(batch, ...)``.
    window
        Side of the square window for image-shaped inputs.

    Returns
    -------
    Tensor
        Shape ``(batch,)``, float64; 1 for identical inputs.

    Examples
    --------
    >>> image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    >>> ssim_lite(image, image)
    tensor([1., 1.], dtype=torch.float64)
    >>> bool((ssim_lite(image, image.flip(-1)) < 0.5).all())
    True
    """
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(f"ssim_lite needs two tensors of the same shape (batch, ...), got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_positive_int(window, "window")
    maps_a, maps_b = (_unit_range(t.detach()) for t in (a, b))
    if a.ndim == 4:
        kernel = (min(window, a.shape[2]), min(window, a.shape[3]))
    else:
        maps_a, maps_b = maps_a.reshape(len(a), 1, 1, -1), maps_b.reshape(len(b), 1, 1, -1)
        kernel = (1, maps_a.shape[-1])

    def local_mean(t: Tensor) -> Tensor:
        return torch.nn.functional.avg_pool2d(t, kernel, stride=1)

    mean_a, mean_b = local_mean(maps_a), local_mean(maps_b)
    var_a = local_mean(maps_a * maps_a) - mean_a.square()
    var_b = local_mean(maps_b * maps_b) - mean_b.square()
    cov = local_mean(maps_a * maps_b) - mean_a * mean_b
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mean_a * mean_b + c1) * (2 * cov + c2)) / ((mean_a.square() + mean_b.square() + c1) * (var_a + var_b + c2))
    return ssim.reshape(len(a), -1).mean(1)


def _unit_range(t: Tensor) -> Tensor:
    """Each sample scaled to [0, 1] (a constant sample becomes zeros), float64."""
    flat = t.double().reshape(len(t), -1)
    low = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - low
    scaled = (flat - low) / torch.where(span > 0, span, torch.ones_like(span))
    return scaled.reshape(t.shape)
