"""Heatmaps, colour maps and grids in lrpkit.image: known relevance -> known pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lrpkit import image
from lrpkit.image import grid, heatmap, normalize, save_png, to_rgb

WHITE, RED, BLUE, BLACK = (255, 255, 255), (255, 0, 0), (0, 0, 255), (0, 0, 0)


def _pixel(rgb: np.ndarray, row: int, col: int) -> tuple[int, ...]:
    return tuple(int(value) for value in rgb[row, col])


@pytest.fixture
def signed_map() -> np.ndarray:
    """A 2x3 map with its most negative value at (0, 0), zero at (0, 1), its maximum at (1, 2)."""
    return np.array([[-2.0, 0.0, 0.5], [1.0, 1.5, 4.0]])


# ---------------------------------------------------------------------------- colour maps


@pytest.mark.parametrize("name", sorted(image.COLORMAPS))
def test_colormaps_give_rgb_in_unit_range(name: str) -> None:
    values = np.linspace(-0.5, 1.5, 41).reshape(41)  # including values outside [0, 1]
    rgb = image.COLORMAPS[name](values)
    assert rgb.shape == (41, 3)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0


def test_bwr_ends_and_centre() -> None:
    rgb = image.bwr(np.array([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(rgb, [[0, 0, 1], [1, 1, 1], [1, 0, 0]])


def test_coldnhot_is_black_at_centre_hot_above_cold_below() -> None:
    rgb = image.coldnhot(np.array([0.5, 0.6, 0.4]))
    np.testing.assert_allclose(rgb[0], [0, 0, 0])
    red, green, blue = rgb[1]
    assert red > 0 and red > green and red > blue  # a little positive: dark red
    red, green, blue = rgb[2]
    assert blue > 0 and blue > red and blue > green  # a little negative: dark blue


def test_gray_is_monotone() -> None:
    rgb = image.gray(np.linspace(0, 1, 11))
    assert np.all(np.diff(rgb[:, 0]) > 0)
    assert np.all(rgb[:, 0] == rgb[:, 1]) and np.all(rgb[:, 1] == rgb[:, 2])


def test_unknown_colormap_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown colour map"):
        heatmap(np.ones((2, 2)), cmap="viridis-ish")


# ------------------------------------------------------------------------------- heatmaps


def test_bwr_heatmap_zero_white_max_red_min_blue(signed_map: np.ndarray) -> None:
    rgb = heatmap(signed_map)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    assert _pixel(rgb, 0, 1) == WHITE  # zero
    assert _pixel(rgb, 1, 2) == RED  # max positive = max |R|
    # the most negative value is -2 = half of max |R|: a half-saturated blue
    red, green, blue = _pixel(rgb, 0, 0)
    assert blue == 255 and red == green and 120 <= red <= 135


def test_symmetric_normalisation_saturates_the_larger_sign() -> None:
    rgb = heatmap(np.array([[-4.0, 0.0, 1.0]]))
    assert _pixel(rgb, 0, 0) == BLUE
    assert _pixel(rgb, 0, 1) == WHITE
    red, green, blue = _pixel(rgb, 0, 2)
    assert red == 255 and green == blue and 185 <= green <= 195  # 1/4 of the way to red


def test_absolute_normalisation_stretches_min_to_max(signed_map: np.ndarray) -> None:
    rgb = heatmap(signed_map, symmetric=False)
    assert _pixel(rgb, 0, 0) == BLUE  # the minimum goes to the bottom of the map
    assert _pixel(rgb, 1, 2) == RED  # the maximum to the top
    # zero is no longer white: it lies at 2/6 of the range, on the blue side
    red, green, blue = _pixel(rgb, 0, 1)
    assert blue == 255 and red < 255


def test_normalize_values() -> None:
    np.testing.assert_allclose(normalize(np.array([-2.0, 0.0, 1.0])), [0.0, 0.5, 0.75])
    np.testing.assert_allclose(normalize(np.array([1.0, 2.0, 3.0]), symmetric=False), [0, 0.5, 1])
    # all-zero relevance stays at the centre (white in bwr), not NaN
    np.testing.assert_allclose(normalize(np.zeros(4)), 0.5)
    assert _pixel(heatmap(np.zeros((2, 2))), 0, 0) == WHITE


def test_coldnhot_heatmap_zero_is_black(signed_map: np.ndarray) -> None:
    rgb = heatmap(signed_map, cmap="coldnhot")
    assert _pixel(rgb, 0, 1) == BLACK
    assert _pixel(rgb, 1, 2) == WHITE  # the hottest value


def test_heatmap_sums_channels_and_accepts_tensors() -> None:
    relevance = torch.zeros(3, 4, 5)
    relevance[0, 1, 2], relevance[1, 1, 2], relevance[2, 1, 2] = 1.0, 2.0, -0.5
    relevance[2, 3, 4] = -2.5  # the minimum after summation, |sum| = max |sum| -> pure blue
    relevance.requires_grad_()
    rgb = heatmap(relevance)
    assert rgb.shape == (4, 5, 3)
    assert _pixel(rgb, 1, 2) == RED
    assert _pixel(rgb, 3, 4) == BLUE
    assert _pixel(rgb, 0, 0) == WHITE
    np.testing.assert_array_equal(heatmap(relevance[None]), rgb)  # a batch of one


def test_heatmap_rejects_batches() -> None:
    with pytest.raises(ValueError, match="one sample"):
        heatmap(np.zeros((2, 1, 4, 4)))


def test_to_rgb_gray_input() -> None:
    digit = torch.tensor([[[0.0, 0.5, 1.0]]])  # (1, H, W)
    rgb = to_rgb(digit, cmap="gray_r", vmin=0.0, vmax=1.0)
    assert rgb.shape == (1, 3, 3)
    assert _pixel(rgb, 0, 0) == WHITE and _pixel(rgb, 0, 2) == BLACK


# ---------------------------------------------------------------------------------- grids


def _tiles(n_rows: int, n_cols: int, size: int = 8) -> list[list[np.ndarray]]:
    return [[np.full((size, size, 3), (10 * (r * n_cols + c)) % 250, np.uint8) for c in range(n_cols)]
            for r in range(n_rows)]


@pytest.mark.parametrize(("n_rows", "n_cols", "scale", "padding"),
                         [(1, 1, 1, 0), (2, 3, 12, 4), (12, 5, 12, 4), (3, 2, 5, 1)])
def test_grid_size_without_labels(n_rows: int, n_cols: int, scale: int, padding: int) -> None:
    picture = grid(_tiles(n_rows, n_cols), scale=scale, padding=padding)
    assert isinstance(picture, Image.Image) and picture.mode == "RGB"
    assert picture.size == (n_cols * 8 * scale + (n_cols + 1) * padding,
                            n_rows * 8 * scale + (n_rows + 1) * padding)


def test_grid_upsamples_with_nearest_neighbour() -> None:
    tile = np.zeros((2, 2, 3), np.uint8)
    tile[0, 1] = RED
    picture = np.asarray(grid([[tile]], scale=10, padding=0))
    assert picture.shape == (20, 20, 3)
    assert (picture[:10, 10:] == RED).all()  # a 10x10 red block, hard edges
    assert (picture[:10, :10] == 0).all() and (picture[10:] == 0).all()


def test_grid_places_cells_after_padding() -> None:
    picture = np.asarray(grid(_tiles(2, 2), scale=2, padding=3, frame_color=None))
    cell = 16
    assert (picture[:3] == 255).all()  # top padding is background
    np.testing.assert_array_equal(picture[3, 3], [0, 0, 0])  # first cell, colour 0
    np.testing.assert_array_equal(picture[3, 3 + cell + 3], [10, 10, 10])  # second column
    np.testing.assert_array_equal(picture[3 + cell + 3, 3], [20, 20, 20])  # second row


def test_grid_labels_add_margins() -> None:
    plain = grid(_tiles(2, 3), scale=12, padding=4)
    labelled = grid(_tiles(2, 3), row_labels=["true 1\npred 1", "true 2\npred 7"],
                    col_labels=["input", "a", "b"], scale=12, padding=4)
    width, height = labelled.size
    assert width > plain.size[0] and height > plain.size[1]
    assert height - plain.size[1] < 60  # one line of text plus padding
    # the labels draw something in the margins
    array = np.asarray(labelled)
    left_margin = width - plain.size[0]
    top_margin = height - plain.size[1]
    assert (array[:, :left_margin] != 255).any()
    assert (array[:top_margin] != 255).any()


def test_grid_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        grid([])
    with pytest.raises(ValueError):
        grid(_tiles(2, 2), row_labels=["only one"])
    with pytest.raises(ValueError):
        grid(_tiles(1, 1), scale=0)


def test_save_png_roundtrip(tmp_path) -> None:
    picture = grid(_tiles(2, 2), scale=3, padding=2)
    path = save_png(picture, tmp_path / "sub" / "grid.png")
    assert path.is_file()
    with Image.open(path) as loaded:
        assert loaded.format == "PNG" and loaded.size == picture.size
        np.testing.assert_array_equal(np.asarray(loaded.convert("RGB")), np.asarray(picture))
    array_path = save_png(heatmap(np.eye(4)), tmp_path / "eye.png")
    with Image.open(array_path) as loaded:
        assert loaded.size == (4, 4)
