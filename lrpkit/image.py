"""Heatmaps, colour maps and image grids for relevance maps, with numpy and Pillow only.

A colour map takes values in [0, 1] and returns RGB in [0, 1]. :func:`heatmap` normalises a
relevance map into [0, 1] (symmetrically around zero by default) and colours it;
:func:`grid` lays images out in labelled rows and columns; :func:`save_png` writes the result.

Examples
--------
>>> import numpy as np
>>> relevance = np.array([[-1.0, 0.0], [0.5, 1.0]])
>>> heatmap(relevance)[0, 1].tolist()          # zero -> the centre of bwr: white
[255, 255, 255]
>>> picture = grid([[heatmap(relevance), heatmap(-relevance)]], scale=10, padding=2)
>>> picture.size
(46, 24)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLORMAPS",
    "bwr",
    "coldnhot",
    "gray",
    "gray_r",
    "grid",
    "heatmap",
    "normalize",
    "save_png",
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


COLORMAPS: dict[str, Colormap] = {
    "bwr": bwr,
    "coldnhot": coldnhot,
    "gray": gray,
    "gray_r": gray_r,
}
"""Colour maps by name, as accepted by :func:`heatmap` and :func:`to_rgb`."""


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


def _to_2d(relevance: np.ndarray) -> np.ndarray:
    """(H, W) as is; (C, H, W) or a batch of one (1, C, H, W) summed over channels."""
    if relevance.ndim == 4 and relevance.shape[0] == 1:
        relevance = relevance[0]
    if relevance.ndim == 3:
        return relevance.sum(axis=0)
    if relevance.ndim == 2:
        return relevance
    raise ValueError(
        "expected one sample's relevance shaped (H, W), (C, H, W) or (1, C, H, W), "
        f"got shape {relevance.shape}"
    )


def normalize(relevance: ArrayLike, symmetric: bool = True) -> np.ndarray:
    """Map a 2-D relevance map into [0, 1].

    Parameters
    ----------
    relevance
        Values of any shape (array or tensor).
    symmetric
        If true, divide by ``max|R|`` and map [-1, 1] to [0, 1], so zero lands on 0.5 (the
        centre of a diverging colour map) and the sign stays visible. If false, stretch
        ``min .. max`` to ``0 .. 1`` (the sign of zero is then lost).

    Returns
    -------
    np.ndarray
        Float64 values in [0, 1]. An all-zero map, and in absolute mode any constant map,
        gives 0.5 everywhere (the neutral centre), never NaN.

    Examples
    --------
    >>> normalize(np.array([-2.0, 0.0, 1.0])).tolist()
    [0.0, 0.5, 0.75]
    >>> normalize(np.array([-2.0, 0.0, 2.0]), symmetric=False).tolist()
    [0.0, 0.5, 1.0]
    >>> normalize(np.array([1.0, 2.0, 3.0]), symmetric=False).tolist()
    [0.0, 0.5, 1.0]
    """
    values = _as_numpy(relevance)
    if symmetric:
        bound = np.abs(values).max(initial=0.0)
        scaled = values / bound if bound > 0 else np.zeros_like(values)
        return (scaled + 1.0) / 2.0
    low, high = values.min(initial=np.inf), values.max(initial=-np.inf)
    if not high > low:  # constant (or empty): the neutral centre of the map
        return np.full_like(values, 0.5)
    return (values - low) / (high - low)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] to uint8 with rounding."""
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def heatmap(
    relevance: ArrayLike,
    cmap: str | Colormap = "bwr",
    symmetric: bool = True,
) -> np.ndarray:
    """Colour one sample's relevance map.

    Parameters
    ----------
    relevance
        One sample's relevance, shaped (H, W), (C, H, W) or (1, C, H, W); numpy array or
        torch tensor (any device). Channels are summed.
    cmap
        ``"bwr"`` (negative blue, zero white, positive red), ``"coldnhot"`` (zero black,
        positive hot, negative cold), ``"gray"``, ``"gray_r"``, or a callable mapping [0, 1]
        to RGB in [0, 1].
    symmetric
        True: normalise by ``max|R|`` so that zero maps to the colour map's centre and the
        strongest relevance of either sign reaches the end of the map. False (absolute
        normalisation): stretch ``min .. max`` over the whole map.

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
    """
    values = _to_2d(_as_numpy(relevance))
    return _to_uint8(_colormap(cmap)(normalize(values, symmetric=symmetric)))


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


def grid(
    images: Sequence[Sequence[ArrayLike]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    scale: int = 12,
    padding: int = 4,
    font_size: int | None = 12,
    background: tuple[int, int, int] = (255, 255, 255),
    text_color: tuple[int, int, int] = (0, 0, 0),
    frame_color: tuple[int, int, int] | None = (190, 190, 190),
) -> Image.Image:
    """Lay out images in labelled rows and columns, upsampled with nearest neighbour.

    Parameters
    ----------
    images
        Rows of images; each a uint8 (H, W, 3) RGB image (as from :func:`heatmap`), a uint8
        (H, W) gray image, or anything :func:`to_rgb` accepts. Rows may differ in length;
        images may differ in size (each is centred horizontally in its column, at the
        top of its row).
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

    Returns
    -------
    PIL.Image.Image
        An RGB image. Each cell is ``max H * scale`` high and ``max W * scale`` wide (a column
        is widened to its label's width plus ``2 * padding`` if that is more). Without labels the
        size is exactly::

            width  = n_cols * cell_width  + (n_cols + 1) * padding
            height = n_rows * cell_height + (n_rows + 1) * padding

        Column labels add ``label_height + padding`` on top, row labels add
        ``label_width + padding`` on the left.

    Examples
    --------
    >>> tiles = [[np.zeros((8, 8, 3), np.uint8)] * 3] * 2
    >>> grid(tiles, scale=12, padding=4).size
    (304, 204)
    >>> labelled = grid(tiles, row_labels=["a", "b"], col_labels=["x", "y", "z"])
    >>> labelled.size[0] > 304 and labelled.size[1] > 204
    True
    """
    if scale < 1 or int(scale) != scale:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    cells = [[_upsample(_as_cell(image), int(scale)) for image in row] for row in images]
    n_rows = len(cells)
    n_cols = max((len(row) for row in cells), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("grid() needs at least one image")
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"{len(row_labels)} row labels for {n_rows} rows")
    if col_labels is not None and len(col_labels) > n_cols:
        raise ValueError(f"{len(col_labels)} column labels for {n_cols} columns")

    font = _load_font(font_size)
    cell_height = max(cell.shape[0] for row in cells for cell in row)
    cell_width = max(cell.shape[1] for row in cells for cell in row)
    col_sizes = [_text_size(str(label), font) for label in (col_labels or [])]
    row_sizes = [_text_size(str(label), font) for label in (row_labels or [])]
    col_widths = [
        max(cell_width, col_sizes[index][0] + 2 * padding if index < len(col_sizes) else 0)
        for index in range(n_cols)
    ]
    top = max((height for _, height in col_sizes), default=0)
    top = top + padding if col_labels else 0
    left = max((width for width, _ in row_sizes), default=0)
    left = left + padding if row_labels else 0

    width = left + sum(col_widths) + (n_cols + 1) * padding
    height = top + n_rows * cell_height + (n_rows + 1) * padding
    canvas = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(canvas)

    col_x = [left + padding + sum(col_widths[:index]) + index * padding for index in range(n_cols)]
    for index, (text_width, text_height) in enumerate(col_sizes):
        x = col_x[index] + (col_widths[index] - text_width) // 2
        draw.multiline_text((x, top - text_height), str(col_labels[index]),
                            fill=text_color, font=font, align="center")
    for row_index, row in enumerate(cells):
        y = top + padding + row_index * (cell_height + padding)
        if row_labels is not None:
            text_width, text_height = row_sizes[row_index]
            draw.multiline_text((left - text_width,
                                 y + (cell_height - text_height) // 2),
                                str(row_labels[row_index]), fill=text_color, font=font,
                                align="right")
        for col_index, cell in enumerate(row):
            x = col_x[col_index] + (col_widths[col_index] - cell.shape[1]) // 2
            canvas.paste(Image.fromarray(cell), (x, y))
            if frame_color is not None and padding >= 1:
                draw.rectangle((x - 1, y - 1, x + cell.shape[1], y + cell.shape[0]),
                               outline=frame_color)
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
