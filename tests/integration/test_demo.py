"""The demo end to end: a digits CNN explained with the core, one PNG grid, a report; the CLI."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("sklearn", reason="the demo needs scikit-learn's digits")

from lrpkit import cli, demo  # noqa: E402
from lrpkit.digits import (  # noqa: E402
    CNN_WEIGHTS_FILE,
    cpu_threads,
    load_digits_tensors,
    pretrained_cnn,
)

SCALE, PADDING, N_COLUMNS = 12, 4, 5  # input + 4 methods
CELL = 8 * SCALE


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: the CNN is trained once, by the first test that needs it."""
    return tmp_path_factory.mktemp("lrpkit-cache")


@pytest.fixture
def env_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LRPKIT_CACHE", str(cache_dir))
    return cache_dir


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        picture.load()  # decodes the whole file: a truncated PNG fails here
        return picture.size


def test_run_demo_writes_png_grid_and_report(env_cache: Path, tmp_path: Path) -> None:
    report = io.StringIO()
    path = demo.run_demo(tmp_path / "out" / "demo.png", n_samples=12, stream=report)
    assert path == (tmp_path / "out" / "demo.png").resolve() and path.is_file()
    assert (env_cache / CNN_WEIGHTS_FILE).is_file()  # trained into $LRPKIT_CACHE

    width, height = _png_size(path)
    # 12 rows of 96-pixel cells, 5 columns at least 96 wide, plus labels in the margins
    assert height > 12 * CELL + 13 * PADDING
    assert height < 12 * CELL + 13 * PADDING + 60
    assert width > N_COLUMNS * CELL + (N_COLUMNS + 1) * PADDING

    # fewer samples: exactly fewer rows, same columns
    small = demo.run_demo(tmp_path / "small.png", n_samples=3, stream=io.StringIO())
    small_width, small_height = _png_size(small)
    assert height - small_height == 9 * (CELL + PADDING)
    assert small_width <= width  # row labels may be narrower, never wider

    text = report.getvalue()
    assert str(path) in text
    assert "only meaningful" in text
    for method in ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1", "Gradient"):
        assert method in text


def test_default_out_path_is_the_current_directory(
    env_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = demo.run_demo(n_samples=2, stream=io.StringIO())
    assert path == tmp_path.resolve() / "lrpkit-demo.png" and path.is_file()


def test_explanations_are_sensible(env_cache: Path) -> None:
    model = pretrained_cnn()
    _, _, x, _ = load_digits_tensors()
    x = x[:8]
    with torch.no_grad():
        predictions = model(x).argmax(dim=1)
    with cpu_threads(1):
        explanations = demo.explain_all(model, x)
    assert [e.method for e in explanations] == [
        "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1", "Gradient"]
    background = x == 0
    for explanation in explanations:
        assert explanation.relevance.shape == x.shape
        assert torch.isfinite(explanation.relevance).all()
        assert torch.equal(explanation.target, predictions)
        assert explanation.relevance.abs().sum() > 0
    by_method = {e.method: e for e in explanations}
    # alpha-beta in the first layer multiplies by the input: blank pixels get no relevance
    assert by_method["EpsilonAlpha2Beta1"].relevance[background].abs().max() == 0
    # LRP explains the logit: the relevance sums are close to it (bias terms absorb some)
    for method in ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"):
        assert float(demo.conservation_error(by_method[method]).mean()) < 0.5, method


def test_cli_demo(env_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.png"
    assert cli.main(["demo", "--out", str(out), "--samples", "2"]) == 0
    assert out.is_file() and str(out.resolve()) in capsys.readouterr().out


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2  # no subcommand: help on stderr
    assert "demo" in capsys.readouterr().err
    assert cli.main(["demo", "--samples", "0"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
