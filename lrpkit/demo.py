"""The lrpkit demo: explain a digits CNN with three LRP composites and the plain gradient.

``run_demo()`` loads (or trains once, a few seconds) the small CNN of :mod:`lrpkit.digits`,
explains the first test digits with ``EpsilonPlusFlat``, ``EpsilonGammaBox(0, 1)``,
``EpsilonAlpha2Beta1`` and the plain gradient, writes one PNG grid and prints how well each
method conserves the explained logit.

Examples
--------
>>> from lrpkit.demo import run_demo
>>> path = run_demo("demo.png", n_samples=4)   # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor, nn

from lrpkit.image import grid, heatmap, save_png, to_rgb

__all__ = [
    "DEFAULT_OUT",
    "Explanation",
    "conservation_error",
    "demo_methods",
    "explain_all",
    "render",
    "run_demo",
]

DEFAULT_OUT = "lrpkit-demo.png"
"""File name of the demo's PNG, written in the current directory unless told otherwise."""


@dataclass(frozen=True)
class Explanation:
    """One method's explanation of a batch.

    Attributes
    ----------
    method
        The method's display name.
    is_lrp
        Whether the method is an LRP composite (so that conservation is expected).
    output
        The model's output (N, classes).
    target
        The explained class per sample (N,): the prediction.
    relevance
        The relevance of the input, shaped like the input.
    """

    method: str
    is_lrp: bool
    output: Tensor
    target: Tensor
    relevance: Tensor


def demo_methods() -> dict[str, Callable[[], Any]]:
    """The demo's methods: display name -> factory of the composite (``None``: plain gradient).

    Returns
    -------
    dict
        Insertion-ordered; the order of the demo's columns.
    """
    from lrpkit import composites

    return {
        "EpsilonPlusFlat": lambda: composites.EpsilonPlusFlat(),
        "EpsilonGammaBox": lambda: composites.EpsilonGammaBox(low=0.0, high=1.0),
        "EpsilonAlpha2Beta1": lambda: composites.EpsilonAlpha2Beta1(),
        "Gradient": lambda: None,
    }


def explain_all(model: nn.Module, x: Tensor) -> list[Explanation]:
    """Explain the predicted class of every sample with every method of :func:`demo_methods`.

    Parameters
    ----------
    model
        A classifier in eval mode.
    x
        Input batch.

    Returns
    -------
    list of Explanation
        One per method, in column order.
    """
    from lrpkit.attribution import Gradient

    explanations = []
    for method, make_composite in demo_methods().items():
        composite = make_composite()
        attribution = Gradient(model, composite=composite)
        output, relevance = attribution(x.clone())  # target None: the predicted class
        output, relevance = output.detach(), relevance.detach()
        explanations.append(
            Explanation(
                method=method,
                is_lrp=composite is not None,
                output=output,
                target=output.argmax(dim=1),
                relevance=relevance,
            )
        )
    return explanations


def conservation_error(explanation: Explanation) -> Tensor:
    """Relative conservation error per sample: ``|sum R - logit| / |logit|``.

    ``logit`` is the explained (predicted) class's output. Near zero for conservative LRP
    rules; the bias terms of Epsilon layers and the stabilisers absorb some relevance. For the
    plain gradient the number has no meaning (a gradient is not a decomposition).

    Returns
    -------
    Tensor
        Shape (N,).
    """
    logit = explanation.output.gather(1, explanation.target[:, None])[:, 0]
    total = explanation.relevance.flatten(start_dim=1).sum(dim=1)
    return (total - logit).abs() / logit.abs().clamp_min(torch.finfo(logit.dtype).tiny)


def render(
    x: Tensor,
    labels: Tensor,
    explanations: list[Explanation],
    cmap: str = "bwr",
) -> Any:
    """The demo grid: one row per sample, columns input + one heatmap per method.

    Parameters
    ----------
    x
        Inputs (N, 1, H, W) in [0, 1].
    labels
        True labels (N,).
    explanations
        As from :func:`explain_all`; the first one's prediction labels the rows.
    cmap
        Colour map of the heatmaps (each heatmap normalised by its own ``max|R|``).

    Returns
    -------
    PIL.Image.Image
        The grid.
    """
    predictions = explanations[0].target
    rows: list[list[np.ndarray]] = []
    row_labels: list[str] = []
    for index in range(len(x)):
        row = [to_rgb(x[index], cmap="gray_r", vmin=0.0, vmax=1.0)]
        row += [heatmap(e.relevance[index], cmap=cmap) for e in explanations]
        rows.append(row)
        true, predicted = int(labels[index]), int(predictions[index])
        mark = "" if true == predicted else "  (wrong)"
        row_labels.append(f"true {true}\npred {predicted}{mark}")
    col_labels = ["input"] + [e.method for e in explanations]
    return grid(rows, row_labels=row_labels, col_labels=col_labels, scale=12)


def _report(path: Path, explanations: list[Explanation], stream: TextIO) -> None:
    """Print where the PNG is and each method's mean relative conservation error."""
    n_samples = len(explanations[0].target)
    print(f"lrpkit demo: wrote {path}", file=stream)
    print(
        f"mean relative conservation error |sum R - logit| / |logit| over {n_samples} samples\n"
        "(only meaningful for the LRP composites; the plain gradient is not a decomposition "
        "and is not expected to conserve anything):",
        file=stream,
    )
    width = max(len(e.method) for e in explanations)
    for explanation in explanations:
        error = float(conservation_error(explanation).mean())
        note = "" if explanation.is_lrp else "   (not LRP: not meaningful)"
        print(f"  {explanation.method:<{width}}  {error:.4f}{note}", file=stream)


def run_demo(
    out_path: str | os.PathLike[str] | None = None,
    n_samples: int = 12,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    stream: TextIO | None = None,
) -> Path:
    """Explain the first test digits with three LRP composites and the gradient; write a PNG.

    Parameters
    ----------
    out_path
        Where to write the PNG; default ``./lrpkit-demo.png``.
    n_samples
        How many test digits (rows) to explain, from the start of the test split.
    cache_dir
        Where the CNN's weights are cached; default as in :func:`lrpkit.digits.pretrained_cnn`
        (``$LRPKIT_CACHE``, ``$XDG_CACHE_HOME/lrpkit`` or ``~/.cache/lrpkit``).
    stream
        Where to print the report; default ``sys.stdout``.

    Returns
    -------
    pathlib.Path
        The PNG written (absolute).

    Examples
    --------
    >>> path = run_demo("demo.png", n_samples=4)   # doctest: +SKIP
    lrpkit demo: wrote .../demo.png
    ...
    """
    from lrpkit.digits import cpu_threads, load_digits_tensors, pretrained_cnn

    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    model = pretrained_cnn(cache_dir=cache_dir)
    _, _, x_test, y_test = load_digits_tensors()
    x, labels = x_test[:n_samples], y_test[:n_samples]

    with cpu_threads(1):  # tiny tensors: one thread is fastest, and robust on a busy CPU
        explanations = explain_all(model, x)
    path = Path(out_path if out_path is not None else DEFAULT_OUT).expanduser().resolve()
    save_png(render(x, labels, explanations), path)
    _report(path, explanations, stream if stream is not None else sys.stdout)
    return path
