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


# ------------------------------------------------------------------ single-sign colour maps


def test_reds_and_blues_show_one_sign() -> None:
    np.testing.assert_allclose(image.reds(np.array([0.0, 0.5, 1.0])), [[1, 1, 1], [1, 1, 1], [1, 0, 0]])
    np.testing.assert_allclose(image.blues(np.array([0.0, 0.5, 1.0])), [[0, 0, 1], [1, 1, 1], [1, 1, 1]])
    relevance = np.array([[-2.0, 0.0, 1.0, 2.0]])
    reds = heatmap(relevance, cmap="reds")
    assert [_pixel(reds, 0, col) for col in range(4)] == [WHITE, WHITE, (255, 128, 128), RED]
    blues = heatmap(relevance, cmap="blues")
    assert [_pixel(blues, 0, col) for col in range(4)] == [BLUE, WHITE, WHITE, WHITE]
    # magnitude map: |R| in reds, the negative end is as red as the positive one
    magnitude = heatmap(relevance, cmap="reds", reduce="abs-sum")
    assert _pixel(magnitude, 0, 0) == RED and _pixel(magnitude, 0, 1) == WHITE


# ------------------------------------------------------------ normalisation: clipping, bound


def test_percentile_clipping_saturates_outliers() -> None:
    relevance = np.array([[0.0, 1.0, 1.0, 1.0, -100.0]])
    plain = heatmap(relevance)
    assert _pixel(plain, 0, 4) == BLUE and _pixel(plain, 0, 1) != RED  # the outlier dominates
    clipped = heatmap(relevance, percentile=75)  # the 75th percentile of |R| is 1
    assert _pixel(clipped, 0, 1) == RED and _pixel(clipped, 0, 4) == BLUE
    assert _pixel(clipped, 0, 0) == WHITE
    # sparse maps: a zero percentile falls back to max|R|, never a division by zero
    sparse = np.zeros((4, 4))
    sparse[0, 0] = 3.0
    assert _pixel(heatmap(sparse, percentile=50), 0, 0) == RED


def test_percentile_in_absolute_mode_clips_both_ends() -> None:
    values = np.array([-50.0, 0.0, 1.0, 2.0, 3.0, 4.0, 60.0])
    unit = normalize(values, symmetric=False, percentile=80)
    assert unit[0] == 0.0 and unit[-1] == 1.0
    low, high = np.percentile(values, 20), np.percentile(values, 80)
    np.testing.assert_allclose(unit[2], (1.0 - low) / (high - low))


def test_bound_fixes_the_scale() -> None:
    relevance = np.array([[-1.0, 0.0, 2.0, 8.0]])
    rgb = heatmap(relevance, bound=2.0)
    assert _pixel(rgb, 0, 2) == RED and _pixel(rgb, 0, 3) == RED  # 8 clipped to the bound
    assert _pixel(rgb, 0, 0) == (128, 128, 255)  # -1 of 2: half-way to blue


@pytest.mark.parametrize("kwargs", [{"percentile": 0}, {"percentile": 101}, {"bound": 0.0},
                                    {"bound": -1.0}])
def test_normalize_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        normalize(np.ones(3), **kwargs)


def test_normalize_absolute_rejects_bound_and_low_percentile() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        normalize(np.ones(3), symmetric=False, bound=1.0)
    with pytest.raises(ValueError, match="percentile"):
        normalize(np.ones(3), symmetric=False, percentile=40)


# -------------------------------------------------------------------- channel reductions


def test_reduce_channels_known_values() -> None:
    relevance = torch.tensor([[[1.0, -4.0]], [[-3.0, 0.0]], [[2.0, 3.0]]])  # (C=3, H=1, W=2)
    expected = {"sum": [[0.0, -1.0]], "abs-sum": [[6.0, 7.0]], "max-norm": [[3.0, 4.0]],
                "l2-norm": [[np.sqrt(14.0), 5.0]]}
    for method, values in expected.items():
        np.testing.assert_allclose(image.reduce_channels(relevance, method), values)
        np.testing.assert_allclose(image.reduce_channels(relevance[None], method), values)
    np.testing.assert_allclose(image.reduce_channels(relevance, lambda r: r[0]), [[1.0, -4.0]])
    np.testing.assert_allclose(image.reduce_channels(relevance[0], "abs-sum"), [[1.0, 4.0]])
    assert set(image.REDUCTIONS) == set(expected)


def test_reduce_channels_rejects_unknown_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="unknown channel reduction"):
        image.reduce_channels(np.ones((2, 3, 3)), "mean-ish")
    with pytest.raises(ValueError, match="returned shape"):
        image.reduce_channels(np.ones((2, 3, 3)), lambda r: r)
    with pytest.raises(ValueError, match="one sample"):
        image.reduce_channels(np.ones((2, 2, 3, 3)))


def test_heatmap_reduce_max_norm_on_channels() -> None:
    relevance = np.zeros((3, 2, 2))
    relevance[0, 0, 0], relevance[1, 0, 0] = 2.0, -2.0  # sums to zero, max |R| = 2
    relevance[2, 1, 1] = -1.0
    assert _pixel(heatmap(relevance), 0, 0) == WHITE  # the signed sum cancels
    rgb = heatmap(relevance, cmap="reds", reduce="max-norm")
    assert _pixel(rgb, 0, 0) == RED and _pixel(rgb, 1, 1) == (255, 128, 128)


# ------------------------------------------------------------------------------ batches


def test_heatmaps_batch_shapes_and_scales() -> None:
    batch = torch.zeros(3, 2, 4, 5)  # (N, C, H, W)
    batch[0, 0, 0, 0] = 1.0
    batch[1, 1, 0, 0] = -4.0
    batch[2, 0, 0, 0] = 2.0
    own = image.heatmaps(batch)
    assert own.shape == (3, 4, 5, 3) and own.dtype == np.uint8
    assert _pixel(own[0], 0, 0) == RED and _pixel(own[1], 0, 0) == BLUE
    assert _pixel(own[2], 0, 0) == RED and _pixel(own[0], 3, 4) == WHITE
    shared = image.heatmaps(batch, shared=True)
    assert _pixel(shared[1], 0, 0) == BLUE
    assert _pixel(shared[0], 0, 0) == (255, 191, 191)  # 1 of 4
    assert _pixel(shared[2], 0, 0) == (255, 128, 128)  # 2 of 4
    for index in range(3):  # each sample alone gives the same picture as heatmap()
        np.testing.assert_array_equal(own[index], heatmap(batch[index]))
    assert image.heatmaps(batch[:, 0]).shape == (3, 4, 5, 3)  # (N, H, W)
    assert _pixel(image.heatmaps(batch, bound=8.0)[1], 0, 0) == (128, 128, 255)  # -4 of 8
    with pytest.raises(ValueError, match="batch"):
        image.heatmaps(np.zeros((4, 5)))


def test_grid_of_a_batch_with_ncols() -> None:
    maps = image.heatmaps(np.random.default_rng(0).normal(size=(7, 8, 8)))
    picture = grid(maps, ncols=3, scale=2, padding=1)
    cell = 16
    assert picture.size == (3 * cell + 4, 3 * cell + 4)  # 7 maps: rows of 3, 3, 1
    array = np.asarray(picture)
    np.testing.assert_array_equal(array[1:1 + cell:2, 1:1 + cell:2], maps[0])
    row3 = 1 + 2 * (cell + 1)
    np.testing.assert_array_equal(array[row3:row3 + cell:2, 1:1 + cell:2], maps[6])
    with pytest.raises(ValueError, match="ncols"):
        grid(maps, ncols=0)


def test_grid_title_and_captions() -> None:
    plain = grid(_tiles(2, 3), scale=4, padding=4)
    titled = grid(_tiles(2, 3), scale=4, padding=4, title="EpsilonPlusFlat")
    assert titled.size[0] == plain.size[0] and titled.size[1] > plain.size[1]
    assert (np.asarray(titled)[:titled.size[1] - plain.size[1]] != 255).any()  # text drawn
    captioned = grid(_tiles(2, 3), scale=4, padding=4, captions=[["a", "b", "c"], ["d"]])
    extra = captioned.size[1] - plain.size[1]
    assert captioned.size[0] == plain.size[0] and extra > 0 and extra % 2 == 0  # same band per row
    wide = grid(_tiles(1, 1), scale=1, padding=2, title="a title much wider than one 8x8 tile")
    assert wide.size[0] > 8 + 4
    flat = grid(list(_tiles(1, 4)[0]), ncols=2, scale=4, padding=4, captions=["w", "x", "y", "z"])
    assert flat.size[0] == 2 * 32 + 3 * 4
    with pytest.raises(ValueError, match="captions"):
        grid(_tiles(1, 2), captions=[["a", "b", "c"]])


# ----------------------------------------------------------------------------- overlays


def test_overlay_alpha_half_gives_the_exact_blend() -> None:
    picture = torch.full((3, 1, 3), 0.25)  # (C, H, W) tensor in [0, 1]: a dark gray
    relevance = torch.tensor([[-2.0, 0.0, 2.0]])
    blended = image.overlay(picture, relevance, alpha=0.5)
    assert blended.shape == (1, 3, 3) and blended.dtype == np.uint8
    # 0.5 * 0.25 + 0.5 * colour: colour 0 -> 0.125 (31.875), colour 1 -> 0.625 (159.375)
    assert _pixel(blended, 0, 0) == (32, 32, 159)  # -max: blue
    assert _pixel(blended, 0, 1) == (159, 159, 159)  # zero: white
    assert _pixel(blended, 0, 2) == (159, 32, 32)  # +max: red


def test_overlay_accepts_image_layouts() -> None:
    relevance = np.array([[-1.0, 1.0]])
    expected = image.overlay(torch.full((3, 1, 2), 0.25), relevance, alpha=0.5)
    for picture in (np.full((1, 2, 3), 0.25),          # H x W x 3 float array
                    np.full((1, 2), 0.25),             # gray H x W
                    np.full((1, 2, 1), 0.25),          # H x W x 1
                    torch.full((1, 1, 2), 0.25),       # (1, H, W) tensor
                    torch.full((1, 3, 1, 2), 0.25)):   # a batch of one
        np.testing.assert_array_equal(image.overlay(picture, relevance, alpha=0.5), expected)
    # uint8: 0.75 * 100 + 0.25 * 255 * colour
    uint8 = image.overlay(np.full((1, 2, 3), 100, np.uint8), relevance, alpha=0.25)
    assert _pixel(uint8, 0, 0) == (75, 75, 139) and _pixel(uint8, 0, 1) == (139, 75, 75)
    with pytest.raises(ValueError, match="cannot overlay"):
        image.overlay(np.zeros((2, 1, 2, 5)), relevance)


def test_overlay_alpha_ends() -> None:
    rng = np.random.default_rng(1)
    picture = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    relevance = rng.normal(size=(4, 4))
    np.testing.assert_array_equal(image.overlay(picture, relevance, alpha=0.0), picture)
    for cmap in ("bwr", "coldnhot", "reds"):
        np.testing.assert_array_equal(image.overlay(picture, relevance, alpha=1.0, cmap=cmap),
                                      heatmap(relevance, cmap=cmap))
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            image.overlay(picture, relevance, alpha=alpha)


def test_overlay_threshold_keeps_the_image_below_it() -> None:
    picture = np.full((1, 4, 3), 0.25)
    relevance = np.array([[4.0, 1.0, -0.4, 0.0]])
    shown = image.overlay(picture, relevance, alpha=0.5, threshold=0.2)  # |R| > 0.8 coloured
    gray = (64, 64, 64)
    assert _pixel(shown, 0, 0) == (159, 32, 32)
    assert _pixel(shown, 0, 1) != gray  # 1 > 0.8
    assert _pixel(shown, 0, 2) == gray and _pixel(shown, 0, 3) == gray
    everywhere_nonzero = image.overlay(picture, relevance, alpha=0.5, threshold=0.0)
    assert _pixel(everywhere_nonzero, 0, 2) != gray and _pixel(everywhere_nonzero, 0, 3) == gray
    assert (image.overlay(picture, np.zeros((1, 4)), threshold=0.0) == 64).all()  # all-zero map
    with pytest.raises(ValueError, match="threshold"):
        image.overlay(picture, relevance, threshold=2.0)


def test_overlay_upsamples_a_coarse_map() -> None:
    board = np.zeros((16, 24, 3), np.uint8)  # 2x3 squares of 8 pixels
    relevance = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    blended = image.overlay(board, relevance, alpha=1.0)
    assert (blended[:8, :8] == RED).all() and (blended[8:, 16:] == BLUE).all()
    assert (blended[:8, 8:16] == WHITE).all()
    with pytest.raises(ValueError, match="does not fit"):
        image.overlay(np.zeros((10, 10, 3)), np.ones((3, 3)))


def test_overlay_saves_as_png(tmp_path) -> None:
    blended = image.overlay(torch.rand(3, 8, 8), torch.randn(3, 8, 8, requires_grad=True),
                            alpha=0.6, reduce="abs-sum", cmap="reds", percentile=99)
    path = save_png(blended, tmp_path / "overlay.png")
    with Image.open(path) as loaded:
        np.testing.assert_array_equal(np.asarray(loaded.convert("RGB")), blended)


def test_text_heatmap_colours_each_token() -> None:
    html_text = image.text_heatmap(["not", "<bad>", "at"], torch.tensor([-2.0, 4.0, 0.0]))
    assert html_text.count("<span") == 4 and "&lt;bad&gt;" in html_text  # one around the tokens; escaped
    assert "rgb(255, 0, 0)" in html_text and "rgb(255, 255, 255)" in html_text  # the maximum red, zero white
    assert "rgb(128, 128, 255)" in html_text  # -2 of 4: half way to blue
    assert 'title="4"' in html_text
    ansi = image.text_heatmap(["a", "b"], [1.0, -1.0], format="ansi", separator="|").split("|")
    assert ansi == ["\x1b[38;2;0;0;0;48;2;255;0;0ma\x1b[0m", "\x1b[38;2;0;0;0;48;2;0;0;255mb\x1b[0m"]
    shared = image.text_heatmap(["a"], [1.0], bound=2.0, format="ansi")  # one scale for several texts
    assert "48;2;255;128;128m" in shared


def test_text_heatmap_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="2 tokens but 3 relevance values"):
        image.text_heatmap(["a", "b"], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="format must be"):
        image.text_heatmap(["a"], [1.0], format="latex")
