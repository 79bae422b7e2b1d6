"""Heatmaps, colour maps, overlays and image grids for relevance maps, with numpy and Pillow only.

A colour map takes values in [0, 1] and returns RGB in [0, 1]; 0.5 is where zero relevance lands
under symmetric normalisation. :func:`normalize` maps relevance into [0, 1] (symmetrically
around zero by default, optionally clipping outliers at a percentile), :func:`reduce_channels`
turns (C, H, W) relevance into one map, :func:`heatmap` and :func:`heatmaps` colour one sample
or a batch, :func:`overlay` blends a heatmap onto the input image, :func:`grid` lays images out
in labelled rows and columns and :func:`save_png` writes the result. :func:`text_heatmap`
colours the tokens of a text (HTML or a terminal's colour codes).

Examples
--------
>>> import numpy as np
>>> relevance = np.array([[-1.0, 0.0], [0.5, 1.0]])
>>> heatmap(relevance)[0, 1].tolist()          # zero -> the centre of bwr: white
[255, 255, 255]
>>> picture = grid([[heatmap(relevance), heatmap(-relevance)]], scale=10, padding=2)
>>> picture.size
(46, 24)
>>> black = np.zeros((2, 2, 3))
>>> overlay(black, relevance, alpha=0.5)[1, 1].tolist()   # half of pure red on black
[128, 0, 0]
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLORMAPS",
    "REDUCTIONS",
    "blues",
    "bwr",
    "coldnhot",
    "gray",
    "gray_r",
    "grid",
    "heatmap",
    "heatmaps",
    "normalize",
    "overlay",
    "reds",
    "reduce_channels",
    "save_png",
    "text_heatmap",
    "to_rgb",
]

ArrayLike = Any  # numpy array, torch tensor, or anything np.asarray understands
Colormap = Callable[[np.ndarray], np.ndarray]


def _as_numpy(values: ArrayLike) -> np.ndarray:
    """A float64 numpy copy of an array or (CPU/CUDA, grad-tracking) tensor."""
    if hasattr(values, "detach"):  # torch.Tensor without importing torch here
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _ramp(values: np.ndarray, start: float, width: float) -> np.ndarray:
    """0 below ``start``, 1 above ``start + width``, linear in between."""
    return np.clip((values - start) / width, 0.0, 1.0)


# ----------------------------------------------------------------------------- colour maps


def bwr(values: np.ndarray) -> np.ndarray:
    """Blue-white-red: 0 -> blue (0, 0, 1), 0.5 -> white, 1 -> red (1, 0, 0).

    Parameters
    ----------
    values
        Array of any shape with values in [0, 1].

    Returns
    -------
    np.ndarray
        RGB in [0, 1], shape ``values.shape + (3,)``.

    Examples
    --------
    >>> bwr(np.array([0.0, 0.5, 1.0])).tolist()
    [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    """
    values = np.clip(values, 0.0, 1.0)
    red = _ramp(values, 0.0, 0.5)
    blue = 1.0 - _ramp(values, 0.5, 0.5)
    green = np.minimum(red, blue)
    return np.stack([red, green, blue], axis=-1)


def coldnhot(values: np.ndarray) -> np.ndarray:
    """Black at the centre, hot (red, yellow, white) above it, cold (blue, cyan, white) below.

    With symmetric normalisation zero relevance is black, positive relevance glows through
    red and yellow to white, negative relevance through blue and cyan to white.

    Parameters
    ----------
    values
        Array of any shape with values in [0, 1]; 0.5 is the centre.

    Returns
    -------
    np.ndarray
        RGB in [0, 1], shape ``values.shape + (3,)``.

    Examples
    --------
    >>> coldnhot(np.array([0.0, 0.5, 1.0])).tolist()
    [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    >>> coldnhot(np.array([0.25, 0.75])).round(2).tolist()
    [[0.0, 0.5, 1.0], [1.0, 0.5, 0.0]]
    """
    values = np.clip(values, 0.0, 1.0)
    hot = np.clip(2.0 * values - 1.0, 0.0, 1.0)  # 0 at the centre, 1 at the top
    cold = np.clip(1.0 - 2.0 * values, 0.0, 1.0)  # 0 at the centre, 1 at the bottom
    third = 1.0 / 3.0
    # hot: red first, then green (-> yellow), then blue (-> white)
    hot_rgb = np.stack(
        [_ramp(hot, 0.0, third), _ramp(hot, third, third), _ramp(hot, 2 * third, third)], axis=-1
    )
    # cold: blue first, then green (-> cyan), then red (-> white)
    cold_rgb = np.stack(
        [_ramp(cold, 2 * third, third), _ramp(cold, third, third), _ramp(cold, 0.0, third)], axis=-1
    )
    return np.maximum(hot_rgb, cold_rgb)


def gray(values: np.ndarray) -> np.ndarray:
    """Black (0) to white (1).

    Examples
    --------
    >>> gray(np.array([0.0, 1.0])).tolist()
    [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    """
    values = np.clip(values, 0.0, 1.0)
    return np.repeat(values[..., None], 3, axis=-1)


def gray_r(values: np.ndarray) -> np.ndarray:
    """White (0) to black (1): dark ink on white paper.

    Examples
    --------
    >>> gray_r(np.array([0.0, 1.0])).tolist()
    [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    """
    return gray(1.0 - np.clip(values, 0.0, 1.0))


def reds(values: np.ndarray) -> np.ndarray:
    """Positive relevance only: white at and below the centre (0.5), red (1, 0, 0) at 1.

    The upper half of :func:`bwr` with the lower half white. Under symmetric normalisation
    (the default of :func:`heatmap`) negative relevance and zero are white and ``max|R|`` is
    pure red; for a magnitude map use ``reduce="abs-sum"`` (all values non-negative).

    Examples
    --------
    >>> reds(np.array([0.0, 0.5, 0.75, 1.0])).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [1.0, 0.0, 0.0]]
    """
    fade = 1.0 - np.clip(2.0 * np.asarray(values, dtype=np.float64) - 1.0, 0.0, 1.0)
    return np.stack([np.ones_like(fade), fade, fade], axis=-1)


def blues(values: np.ndarray) -> np.ndarray:
    """Negative relevance only: blue (0, 0, 1) at 0, white at and above the centre (0.5).

    The lower half of :func:`bwr` with the upper half white: under symmetric normalisation
    ``-max|R|`` is pure blue and zero and positive relevance are white.

    Examples
    --------
    >>> blues(np.array([0.0, 0.25, 0.5, 1.0])).tolist()
    [[0.0, 0.0, 1.0], [0.5, 0.5, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    fade = 1.0 - np.clip(1.0 - 2.0 * np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([fade, fade, np.ones_like(fade)], axis=-1)


COLORMAPS: dict[str, Colormap] = {
    "blues": blues,
    "bwr": bwr,
    "coldnhot": coldnhot,
    "gray": gray,
    "gray_r": gray_r,
    "reds": reds,
}
"""Colour maps by name, as accepted by :func:`heatmap`, :func:`overlay` and :func:`to_rgb`."""


def _colormap(cmap: str | Colormap) -> Colormap:
    """Resolve a colour-map name (or pass a callable through)."""
    if callable(cmap):
        return cmap
    try:
        return COLORMAPS[cmap]
    except KeyError:
        known = ", ".join(sorted(COLORMAPS))
        raise ValueError(f"unknown colour map {cmap!r}; known: {known}") from None


# ------------------------------------------------------------------------------- heatmaps

Reduction = Union[str, Callable[[np.ndarray], np.ndarray]]


def _sum(relevance: np.ndarray) -> np.ndarray:
    return relevance.sum(axis=0)


def _abs_sum(relevance: np.ndarray) -> np.ndarray:
    return np.abs(relevance).sum(axis=0)


def _max_norm(relevance: np.ndarray) -> np.ndarray:
    return np.abs(relevance).max(axis=0)


def _l2_norm(relevance: np.ndarray) -> np.ndarray:
    return np.sqrt(np.square(relevance).sum(axis=0))


REDUCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sum": _sum,
    "abs-sum": _abs_sum,
    "max-norm": _max_norm,
    "l2-norm": _l2_norm,
}
"""Channel reductions by name, as accepted by :func:`reduce_channels` (``reduce=`` elsewhere):
``"sum"`` (signed; conserves the total relevance), ``"abs-sum"`` (sum of ``|R|``),
``"max-norm"`` (largest ``|R|`` over the channels) and ``"l2-norm"`` (Euclidean norm over the
channels). All but ``"sum"`` give non-negative maps."""


def reduce_channels(relevance: ArrayLike, method: Reduction = "sum") -> np.ndarray:
    """One sample's relevance as one (H, W) map.

    Parameters
    ----------
    relevance
        Shaped (C, H, W), a batch of one (1, C, H, W), or (H, W) (one channel: ``"sum"``
        returns it as it is, the other reductions its magnitude); numpy array or torch tensor
        (any device, with or without grad).
    method
        A name from :data:`REDUCTIONS` (``"sum"``, ``"abs-sum"``, ``"max-norm"``,
        ``"l2-norm"``) or a callable taking the (C, H, W) float64 array and returning (H, W).

    Returns
    -------
    np.ndarray
        Float64 array shaped (H, W).

    Raises
    ------
    ValueError
        For other shapes (a batch of several samples: see :func:`heatmaps`) or an unknown name.

    Examples
    --------
    >>> relevance = np.array([[[1.0]], [[-3.0]], [[2.0]]])      # (C=3, H=1, W=1)
    >>> [reduce_channels(relevance, name).item() for name in REDUCTIONS]
    [0.0, 6.0, 3.0, 3.7416573867739413]
    """
    values = _as_numpy(relevance)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim == 2:  # one channel: "sum" keeps it, the others take its magnitude
        values = values[None]
    if values.ndim != 3:
        raise ValueError(
            "expected one sample's relevance shaped (H, W), (C, H, W) or (1, C, H, W), "
            f"got shape {values.shape}; use heatmaps() for a batch"
        )
    if callable(method):
        reduced = np.asarray(method(values), dtype=np.float64)
        if reduced.shape != values.shape[1:]:
            raise ValueError(
                f"the channel reduction returned shape {reduced.shape}, expected {values.shape[1:]}"
            )
        return reduced
    try:
        return REDUCTIONS[method](values)
    except KeyError:
        known = ", ".join(REDUCTIONS)
        raise ValueError(f"unknown channel reduction {method!r}; known: {known}") from None


def _to_2d(relevance: np.ndarray, method: Reduction = "sum") -> np.ndarray:
    """(H, W) as is; (C, H, W) or a batch of one (1, C, H, W) reduced over channels."""
    return reduce_channels(relevance, method)


def _check_percentile(percentile: float | None, low: float) -> None:
    if percentile is not None and not low < percentile <= 100:
        raise ValueError(f"percentile must be in ({low:g}, 100], got {percentile!r}")


def _symmetric_bound(values: np.ndarray, percentile: float | None = None,
                     bound: float | None = None) -> float:
    """The magnitude mapped to ±1: ``bound``, else a percentile of ``|R|``, else ``max|R|``.

    A percentile of zero (sparse relevance) falls back to ``max|R|``; 0 only for all-zero maps.
    """
    if bound is not None:
        if not bound > 0:
            raise ValueError(f"bound must be positive, got {bound!r}")
        return float(bound)
    _check_percentile(percentile, 0.0)
    magnitude = np.abs(values)
    largest = float(magnitude.max(initial=0.0))
    if percentile is None or magnitude.size == 0:
        return largest
    clipped = float(np.percentile(magnitude, percentile))
    return clipped if clipped > 0 else largest


def normalize(
    relevance: ArrayLike,
    symmetric: bool = True,
    *,
    percentile: float | None = None,
    bound: float | None = None,
) -> np.ndarray:
    """Map relevance into [0, 1].

    Parameters
    ----------
    relevance
        Values of any shape (array or tensor).
    symmetric
        If true, divide by ``max|R|`` and map [-1, 1] to [0, 1], so zero lands on 0.5 (the
        centre of a diverging colour map) and the sign stays visible. If false (absolute
        normalisation), stretch ``min .. max`` to ``0 .. 1`` (the sign of zero is then lost).
    percentile
        Clip outliers: symmetric mode divides by this percentile of ``|R|`` instead of its
        maximum (in (0, 100]; if the percentile is 0, as for sparse maps, ``max|R|`` is used);
        absolute mode stretches the ``100 - percentile`` .. ``percentile`` percentiles (in
        (50, 100]). Values beyond are clipped to 0 and 1.
    bound
        Symmetric mode only: the magnitude mapped to ±1 (values beyond are clipped), e.g. one
        shared ``max|R|`` for several maps that should be compared on one scale.

    Returns
    -------
    np.ndarray
        Float64 values in [0, 1]. An all-zero map, and in absolute mode any constant map,
        gives 0.5 everywhere (the neutral centre), never NaN.

    Raises
    ------
    ValueError
        For a percentile out of range, a non-positive bound, or a bound in absolute mode.

    Examples
    --------
    >>> normalize(np.array([-2.0, 0.0, 1.0])).tolist()
    [0.0, 0.5, 0.75]
    >>> normalize(np.array([-2.0, 0.0, 2.0]), symmetric=False).tolist()
    [0.0, 0.5, 1.0]
    >>> normalize(np.array([1.0, 2.0, 3.0]), symmetric=False).tolist()
    [0.0, 0.5, 1.0]
    >>> normalize(np.array([-1.0, 0.0, 1.0]), bound=2.0).tolist()
    [0.25, 0.5, 0.75]
    >>> normalize(np.array([0.0, 1.0, 1.0, 1.0, 100.0]), percentile=75).tolist()  # 100 clipped
    [0.5, 1.0, 1.0, 1.0, 1.0]
    """
    values = _as_numpy(relevance)
    if symmetric:
        scale = _symmetric_bound(values, percentile, bound)
        scaled = np.clip(values / scale, -1.0, 1.0) if scale > 0 else np.zeros_like(values)
        return (scaled + 1.0) / 2.0
    if bound is not None:
        raise ValueError("bound= applies to symmetric normalisation only (symmetric=True)")
    _check_percentile(percentile, 50.0)
    low, high = values.min(initial=np.inf), values.max(initial=-np.inf)
    if percentile is not None and values.size:
        clipped_low = float(np.percentile(values, 100.0 - percentile))
        clipped_high = float(np.percentile(values, percentile))
        if clipped_high > clipped_low:
            low, high = clipped_low, clipped_high
    if not high > low:  # constant (or empty): the neutral centre of the map
        return np.full_like(values, 0.5)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] to uint8 with rounding."""
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def heatmap(
    relevance: ArrayLike,
    cmap: str | Colormap = "bwr",
    symmetric: bool = True,
    *,
    percentile: float | None = None,
    bound: float | None = None,
    reduce: Reduction = "sum",
) -> np.ndarray:
    """Colour one sample's relevance map.

    Parameters
    ----------
    relevance
        One sample's relevance, shaped (H, W), (C, H, W) or (1, C, H, W); numpy array or
        torch tensor (any device).
    cmap
        ``"bwr"`` (negative blue, zero white, positive red), ``"coldnhot"`` (zero black,
        positive hot, negative cold), ``"reds"`` / ``"blues"`` (only positive / only negative
        relevance, the rest white), ``"gray"``, ``"gray_r"``, or a callable mapping [0, 1] to
        RGB in [0, 1].
    symmetric
        True: normalise by ``max|R|`` so that zero maps to the colour map's centre and the
        strongest relevance of either sign reaches the end of the map. False (absolute
        normalisation): stretch ``min .. max`` over the whole map.
    percentile, bound
        Outlier clipping and a fixed scale; see :func:`normalize`.
    reduce
        How (C, H, W) relevance becomes one map; see :func:`reduce_channels`.

    Returns
    -------
    np.ndarray
        uint8 RGB image shaped (H, W, 3).

    Examples
    --------
    >>> relevance = np.array([[-1.0, 0.0, 0.5, 1.0]])
    >>> heatmap(relevance).tolist()
    [[[0, 0, 255], [255, 255, 255], [255, 128, 128], [255, 0, 0]]]
    >>> heatmap(relevance, symmetric=False)[0, 0].tolist()   # the minimum is blue
    [0, 0, 255]
    >>> heatmap(relevance, cmap="coldnhot")[0, 1].tolist()   # zero is black
    [0, 0, 0]
    >>> heatmap(relevance, cmap="reds", reduce="abs-sum")[0, 0].tolist()   # |R|: -1 is red
    [255, 0, 0]
    """
    values = _to_2d(_as_numpy(relevance), reduce)
    unit = normalize(values, symmetric=symmetric, percentile=percentile, bound=bound)
    return _to_uint8(_colormap(cmap)(unit))


TextFormat = Literal["html", "ansi"]


def text_heatmap(
    tokens: Sequence[str],
    relevance: ArrayLike,
    cmap: str | Colormap = "bwr",
    *,
    format: TextFormat = "html",
    percentile: float | None = None,
    bound: float | None = None,
    separator: str = " ",
) -> str:
    """Colour each token of one text by its relevance: the text view of a heatmap.

    Parameters
    ----------
    tokens
        The words or tokens of one sample, e.g. ``tokenizer.convert_ids_to_tokens(ids[0])``.
    relevance
        One value per token (``Attribution.relevance[0]`` of token ids), array or tensor.
    cmap
        A colour map as for :func:`heatmap`; the default ``"bwr"`` shades positive relevance
        red and negative blue, normalised symmetrically so that zero stays white.
    format
        ``"html"``: ``<span>`` elements with a background colour and the value as a tooltip, in
        one ``<span>`` (put it in a page, or display it in a notebook);
        ``"ansi"``: 24-bit colour escape codes for a terminal.
    percentile, bound
        Outlier clipping and a fixed scale shared by several texts; see :func:`normalize`.
    separator
        Put between tokens (``""`` for sub-word tokens that carry their own spaces).

    Returns
    -------
    str

    Examples
    --------
    >>> text_heatmap(["not", "bad", "at", "all"], [-0.5, 1.0, 0.0, 0.25], format="ansi").split(" ")[1]
    '\\x1b[38;2;0;0;0;48;2;255;0;0mbad\\x1b[0m'
    >>> print(text_heatmap(["good"], [1.0])[:61])
    <span style="line-height: 1.9; font-family: sans-serif"><span
    """
    values = _as_numpy(relevance).reshape(-1)
    if len(tokens) != values.size:
        raise ValueError(f"got {len(tokens)} tokens but {values.size} relevance values; give one value per token")
    colours = _to_uint8(_colormap(cmap)(normalize(values, percentile=percentile, bound=bound)))
    if format == "ansi":
        return separator.join(
            f"\x1b[38;2;0;0;0;48;2;{red};{green};{blue}m{token}\x1b[0m" for token, (red, green, blue) in zip(tokens, colours)
        )
    if format != "html":
        raise ValueError(f"format must be 'html' or 'ansi', got {format!r}")
    spans = separator.join(
        f'<span style="background-color: rgb({red}, {green}, {blue}); padding: 0 2px" '
        f'title="{value:.4g}">{html.escape(token)}</span>'
        for token, value, (red, green, blue) in zip(tokens, values, colours)
    )
    return f'<span style="line-height: 1.9; font-family: sans-serif">{spans}</span>'


def _batch_to_maps(relevance: ArrayLike, reduce: Reduction) -> np.ndarray:
    """A batch (N, H, W) or (N, C, H, W) as (N, H, W) maps."""
    values = _as_numpy(relevance)
    if values.ndim == 3:
        return values
    if values.ndim == 4:
        maps = [reduce_channels(sample, reduce) for sample in values]
        return np.stack(maps) if maps else np.zeros((0, *values.shape[2:]))
    raise ValueError(
        f"expected a batch of relevance shaped (N, H, W) or (N, C, H, W), got shape {values.shape}"
    )


def heatmaps(
    relevance: ArrayLike,
    cmap: str | Colormap = "bwr",
    symmetric: bool = True,
    *,
    shared: bool = False,
    percentile: float | None = None,
    bound: float | None = None,
    reduce: Reduction = "sum",
) -> np.ndarray:
    """Colour a batch of relevance maps, each on its own scale or all on one.

    Parameters
    ----------
    relevance
        A batch shaped (N, C, H, W) (channels reduced with ``reduce``) or (N, H, W); the first
        axis is always the batch.
    cmap, symmetric, percentile, bound, reduce
        As for :func:`heatmap`; a ``bound`` is one fixed scale for every map.
    shared
        False: each map is normalised on its own (its own ``max|R|``). True: one scale for the
        whole batch (the batch's ``max|R|``, percentile or min .. max), so that the maps'
        colours compare across samples.

    Returns
    -------
    np.ndarray
        uint8 RGB images shaped (N, H, W, 3); pass them to :func:`grid` with ``ncols=``.

    Examples
    --------
    >>> batch = np.array([[[1.0, 0.0]], [[4.0, -2.0]]])        # (N=2, H=1, W=2)
    >>> heatmaps(batch).shape
    (2, 1, 2, 3)
    >>> heatmaps(batch)[0, 0, 0].tolist()                       # own scale: 1 is max|R|
    [255, 0, 0]
    >>> heatmaps(batch, shared=True)[0, 0, 0].tolist()          # shared scale: 1 of 4
    [255, 191, 191]
    """
    maps = _batch_to_maps(relevance, reduce)
    colormap = _colormap(cmap)
    options = {"symmetric": symmetric, "percentile": percentile, "bound": bound}
    if shared:
        unit = normalize(maps, **options)
    else:
        unit = np.stack([normalize(one, **options) for one in maps]) if len(maps) else maps
    return _to_uint8(colormap(unit))


def to_rgb(
    image: ArrayLike,
    cmap: str | Colormap = "gray",
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Turn an input image into uint8 RGB for display next to its heatmaps.

    Parameters
    ----------
    image
        (H, W), (1, H, W), (3, H, W), (H, W, 3) or a batch of one of these; array or tensor.
        uint8 (H, W, 3) is returned as is. A float 3-D array whose first axis has length 1
        or 3 is read channels-first. Three-channel images are scaled, not coloured.
    cmap
        Colour map for single-channel images.
    vmin, vmax
        Value range mapped to [0, 1]; default the image's own minimum and maximum.

    Returns
    -------
    np.ndarray
        uint8 RGB image shaped (H, W, 3).

    Examples
    --------
    >>> to_rgb(np.array([[0.0, 1.0]]), cmap="gray_r").tolist()
    [[[255, 255, 255], [0, 0, 0]]]
    """
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 \
            and image.shape[-1] == 3:
        return image
    values = _as_numpy(image)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim == 3 and values.shape[0] in (1, 3):
        values = np.moveaxis(values, 0, -1)  # channels first (PyTorch's layout wins ties)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    low = values.min() if vmin is None else vmin
    high = values.max() if vmax is None else vmax
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if values.ndim == 2:
        return _to_uint8(_colormap(cmap)(scaled))
    if values.ndim == 3 and values.shape[-1] == 3:
        return _to_uint8(scaled)
    raise ValueError(f"cannot show an image shaped {np.shape(image)} as RGB")


# ------------------------------------------------------------------------------- overlays


def _image_to_unit_rgb(image: ArrayLike) -> np.ndarray:
    """An input image as float64 RGB (H, W, 3) in [0, 1], without rescaling its values.

    uint8 is divided by 255; floats are taken to lie in [0, 1] (clipped). Tensors are read
    channels-first ((C, H, W) or (1, C, H, W)); numpy arrays channels-last when the last axis
    has length 1 or 3, else channels-first when the first has.
    """
    is_tensor = hasattr(image, "detach")
    raw = image.detach().cpu().numpy() if is_tensor else np.asarray(image)
    values = raw / 255.0 if raw.dtype == np.uint8 else raw.astype(np.float64)
    if values.ndim == 4 and values.shape[0] == 1:
        values = values[0]
    if values.ndim == 3:
        channels_last = not is_tensor and values.shape[-1] in (1, 3)
        if not channels_last and values.shape[0] in (1, 3):
            values = np.moveaxis(values, 0, -1)
        if values.shape[-1] == 1:
            values = values[..., 0]
    if values.ndim == 2:
        values = np.repeat(values[..., None], 3, axis=-1)
    if values.ndim != 3 or values.shape[-1] != 3:
        raise ValueError(
            f"cannot overlay onto an image shaped {np.shape(raw)}; expected (H, W), (H, W, 3) or "
            "(H, W, 1) arrays, or (C, H, W) / (1, C, H, W) tensors with C = 1 or 3"
        )
    return np.clip(values, 0.0, 1.0)


def _fit_to(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upsample an (h, w) map to (height, width) by whole-number factors (nearest neighbour)."""
    h, w = values.shape
    if (h, w) == (height, width):
        return values
    if h and w and height % h == 0 and width % w == 0:
        return np.repeat(np.repeat(values, height // h, axis=0), width // w, axis=1)
    raise ValueError(
        f"relevance of size {h}x{w} does not fit an image of size {height}x{width}: the image's "
        "height and width must be the relevance's times whole numbers"
    )


def overlay(
    image: ArrayLike,
    relevance: ArrayLike,
    alpha: float = 0.5,
    cmap: str | Colormap = "bwr",
    symmetric: bool = True,
    *,
    threshold: float | None = None,
    percentile: float | None = None,
    bound: float | None = None,
    reduce: Reduction = "sum",
) -> np.ndarray:
    """Blend a relevance heatmap onto the input image.

    Every pixel becomes ``(1 - alpha) * image + alpha * colour`` (in [0, 1], then rounded to
    uint8), where ``colour`` is the colour map's value for the normalised relevance, unrounded.

    Parameters
    ----------
    image
        The input: a (C, H, W) or (1, C, H, W) tensor (C = 1 or 3), or an (H, W, 3), (H, W, 1)
        or (H, W) array; uint8 (0 .. 255) or floats in [0, 1] (clipped, not rescaled: use
        :func:`to_rgb` first for other ranges).
    relevance
        One sample's relevance, (H, W), (C, H, W) or (1, C, H, W), reduced over channels with
        ``reduce``. A map smaller than the image by whole-number factors (an 8x8 board under a
        320x320 picture of it) is upsampled with nearest neighbour.
    alpha
        Opacity of the heatmap in [0, 1]: 0 gives the image, 1 the heatmap.
    cmap, symmetric, percentile, bound, reduce
        As for :func:`heatmap`.
    threshold
        If given, only pixels with ``|R| > threshold * scale`` are coloured, where ``scale`` is
        the symmetric normalisation's ``max|R|`` (or its ``percentile``, or ``bound``); the
        others show the image unchanged. ``0`` colours every non-zero pixel.

    Returns
    -------
    np.ndarray
        uint8 RGB image shaped (H, W, 3), the image's size.

    Raises
    ------
    ValueError
        For ``alpha`` or ``threshold`` outside [0, 1], or sizes that do not fit.

    Examples
    --------
    >>> white = np.full((1, 3, 3), 255, np.uint8)               # uint8 H x W x 3
    >>> relevance = np.array([[-2.0, 0.0, 2.0]])
    >>> overlay(white, relevance, alpha=0.5).tolist()
    [[[128, 128, 255], [255, 255, 255], [255, 128, 128]]]
    >>> overlay(white, np.array([[-2.0, 0.1, 2.0]]), cmap="coldnhot", threshold=0.1)[0, 1].tolist()
    [255, 255, 255]
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1] (a fraction of max|R|), got {threshold!r}")
    base = _image_to_unit_rgb(image)
    values = _fit_to(_to_2d(_as_numpy(relevance), reduce), base.shape[0], base.shape[1])
    unit = normalize(values, symmetric=symmetric, percentile=percentile, bound=bound)
    colour = _colormap(cmap)(unit)
    blended = (1.0 - alpha) * base + alpha * colour
    if threshold is not None:
        scale = _symmetric_bound(values, percentile, bound)
        shown = np.abs(values) > threshold * scale
        blended = np.where(shown[..., None], blended, base)
    return _to_uint8(blended)


# ---------------------------------------------------------------------------------- grids


def _load_font(size: int | None) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font, at ``size`` pixels where this Pillow build can scale it."""
    if size is not None:
        try:
            return ImageFont.load_default(size=size)
        except (TypeError, ImportError, OSError):  # old Pillow or no FreeType
            pass
    return ImageFont.load_default()


def _text_size(text: str, font: Any) -> tuple[int, int]:
    """Width and height in pixels of (possibly multi-line) ``text`` drawn in ``font``."""
    if not text:
        return 0, 0
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = scratch.multiline_textbbox((0, 0), text, font=font)
    return int(np.ceil(right - left)), int(np.ceil(bottom - min(top, 0)))


def _as_cell(image: ArrayLike) -> np.ndarray:
    """A grid cell as uint8 (H, W, 3): uint8 RGB as is, anything else through :func:`to_rgb`."""
    array = image if isinstance(image, np.ndarray) else _as_numpy(image)
    if array.dtype == np.uint8 and array.ndim == 3 and array.shape[-1] == 3:
        return array
    if array.dtype == np.uint8 and array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    return to_rgb(array)


def _upsample(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upsampling by an integer factor (every pixel becomes a square)."""
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def _rows_of(items: Sequence[Any], ncols: int) -> list[list[Any]]:
    """A flat sequence (or a batch array) cut into rows of ``ncols``."""
    flat = list(items)
    return [flat[start:start + ncols] for start in range(0, len(flat), ncols)]


def grid(
    images: Sequence[Sequence[ArrayLike]] | Sequence[ArrayLike],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    scale: int = 12,
    padding: int = 4,
    font_size: int | None = 12,
    background: tuple[int, int, int] = (255, 255, 255),
    text_color: tuple[int, int, int] = (0, 0, 0),
    frame_color: tuple[int, int, int] | None = (190, 190, 190),
    *,
    title: str | None = None,
    captions: Sequence[Sequence[str]] | Sequence[str] | None = None,
    ncols: int | None = None,
) -> Image.Image:
    """Lay out images in labelled rows and columns, upsampled with nearest neighbour.

    Parameters
    ----------
    images
        Rows of images; each a uint8 (H, W, 3) RGB image (as from :func:`heatmap`), a uint8
        (H, W) gray image, or anything :func:`to_rgb` accepts. Rows may differ in length;
        images may differ in size (each is centred horizontally in its column, at the
        top of its row). With ``ncols``: one flat sequence of images, or a batch array such as
        the (N, H, W, 3) result of :func:`heatmaps`.
    row_labels
        One text per row, drawn left of the row (``"\\n"`` breaks lines).
    col_labels
        One text per column, drawn above the column.
    scale
        Integer upsampling factor; an 8x8 digit at ``scale=12`` is 96x96 pixels.
    padding
        Pixels between cells, around the grid and around the labels.
    font_size
        Size of Pillow's default font (scalable in Pillow >= 10.1; ignored otherwise).
    background, text_color
        RGB colours of the canvas and the labels.
    frame_color
        Colour of a one-pixel frame drawn just outside every image (in the padding), so that
        white heatmap borders stay visible on a white canvas; ``None`` for no frame.
    title
        A heading centred above everything.
    captions
        A text under each image, shaped like ``images`` (rows of texts; flat with ``ncols``);
        missing or empty entries draw nothing.
    ncols
        Wrap a flat sequence of images (and captions) into rows of this many columns.

    Returns
    -------
    PIL.Image.Image
        An RGB image. Each cell is ``max H * scale`` high and ``max W * scale`` wide (a column
        is widened to its label's or a caption's width plus ``2 * padding`` if that is more).
        Without labels, title or captions the size is exactly::

            width  = n_cols * cell_width  + (n_cols + 1) * padding
            height = n_rows * cell_height + (n_rows + 1) * padding

        Column labels add ``label_height + padding`` on top, row labels add
        ``label_width + padding`` on the left, captions ``caption_height + padding`` to every
        row, a title ``title_height + padding`` on top (and the width of the title plus
        ``2 * padding`` if that is wider; the grid is then centred).

    Examples
    --------
    >>> tiles = [[np.zeros((8, 8, 3), np.uint8)] * 3] * 2
    >>> grid(tiles, scale=12, padding=4).size
    (304, 204)
    >>> labelled = grid(tiles, row_labels=["a", "b"], col_labels=["x", "y", "z"])
    >>> labelled.size[0] > 304 and labelled.size[1] > 204
    True
    >>> grid(np.zeros((6, 8, 8, 3), np.uint8), ncols=3, scale=12, padding=4).size   # a batch
    (304, 204)
    >>> titled = grid(tiles, title="EpsilonPlusFlat", captions=[["1", "2", "3"], ["4"]])
    >>> titled.size[0] == 304 and titled.size[1] > 204
    True
    """
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if ncols is not None:
        if ncols < 1 or int(ncols) != ncols:
            raise ValueError(f"ncols must be a positive integer, got {ncols!r}")
        images = _rows_of(images, int(ncols))
        if captions is not None:
            captions = _rows_of(captions, int(ncols))
    cells = [[_upsample(_as_cell(image), int(scale)) for image in row] for row in images]
    n_rows = len(cells)
    n_cols = max((len(row) for row in cells), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("grid() needs at least one image")
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"{len(row_labels)} row labels for {n_rows} rows")
    if col_labels is not None and len(col_labels) > n_cols:
        raise ValueError(f"{len(col_labels)} column labels for {n_cols} columns")
    caption_rows = [[str(text) if text is not None else "" for text in row]
                    for row in (captions or [])]
    if len(caption_rows) > n_rows or any(
            len(texts) > len(cells[index]) for index, texts in enumerate(caption_rows)):
        raise ValueError("more captions than images; give captions shaped like the images")

    font = _load_font(font_size)
    cell_height = max(cell.shape[0] for row in cells for cell in row)
    cell_width = max(cell.shape[1] for row in cells for cell in row)
    col_sizes = [_text_size(str(label), font) for label in (col_labels or [])]
    row_sizes = [_text_size(str(label), font) for label in (row_labels or [])]
    caption_sizes = [[_text_size(text, font) for text in row] for row in caption_rows]
    col_widths = [
        max(cell_width, col_sizes[index][0] + 2 * padding if index < len(col_sizes) else 0,
            *(row[index][0] + 2 * padding for row in caption_sizes
              if index < len(row) and row[index][0]))
        for index in range(n_cols)
    ]
    caption_height = max((height for row in caption_sizes for _, height in row), default=0)
    caption_band = caption_height + padding if caption_height else 0
    row_height = cell_height + caption_band
    top = max((height for _, height in col_sizes), default=0)
    top = top + padding if col_labels else 0
    left = max((width for width, _ in row_sizes), default=0)
    left = left + padding if row_labels else 0
    title_width, title_height = _text_size(title or "", font)
    heading = title_height + padding if title else 0

    content_width = left + sum(col_widths) + (n_cols + 1) * padding
    width = max(content_width, title_width + 2 * padding if title else 0)
    height = heading + top + n_rows * row_height + (n_rows + 1) * padding
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)
    shift = (width - content_width) // 2  # centres the grid under a wider title

    if title:
        draw.multiline_text(((width - title_width) // 2, padding), title, fill=text_color,
                            font=font, align="center")
    top += heading
    col_x = [shift + left + padding + sum(col_widths[:index]) + index * padding
             for index in range(n_cols)]
    for index, (text_width, text_height) in enumerate(col_sizes):
        x = col_x[index] + (col_widths[index] - text_width) // 2
        draw.multiline_text((x, top - text_height), str(col_labels[index]),
                            fill=text_color, font=font, align="center")
    for row_index, row in enumerate(cells):
        y = top + padding + row_index * (row_height + padding)
        if row_labels is not None:
            text_width, text_height = row_sizes[row_index]
            draw.multiline_text((shift + left - text_width,
                                 y + (cell_height - text_height) // 2),
                                str(row_labels[row_index]), fill=text_color, font=font,
                                align="right")
        for col_index, cell in enumerate(row):
            x = col_x[col_index] + (col_widths[col_index] - cell.shape[1]) // 2
            canvas.paste(Image.fromarray(cell), (x, y))
            if frame_color is not None and padding >= 1:
                draw.rectangle((x - 1, y - 1, x + cell.shape[1], y + cell.shape[0]),
                               outline=frame_color)
            if row_index < len(caption_rows) and col_index < len(caption_rows[row_index]):
                text = caption_rows[row_index][col_index]
                text_width, _ = caption_sizes[row_index][col_index]
                if text:
                    draw.multiline_text(
                        (col_x[col_index] + (col_widths[col_index] - text_width) // 2,
                         y + cell_height + padding),
                        text, fill=text_color, font=font, align="center")
    return canvas


def save_png(image: Union[Image.Image, np.ndarray], path: str | os.PathLike[str]) -> Path:
    """Write an image as PNG, creating missing parent directories.

    Parameters
    ----------
    image
        A PIL image, or a uint8 (H, W, 3) / (H, W) array.
    path
        Where to write; the PNG format is used whatever the suffix.

    Returns
    -------
    pathlib.Path
        The path written.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "heatmap.png"
    >>> save_png(heatmap(np.eye(8)), target).name
    'heatmap.png'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(_as_cell(image))
    image.save(target, format="PNG")
    return target
