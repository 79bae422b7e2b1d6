"""The examples in examples/ run in-process and do what they say (examples/othello.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image

from helpers import hooks_left

ROOT = Path(__file__).resolve().parents[2]
SQUARE = 32
BOARD = 8 * SQUARE
N_COLUMNS, N_ROWS = 5, 2  # position + 4 overlays; value and move


def _load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` from its file (examples/ is not a package)."""
    path = ROOT / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"lrpkit_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


@pytest.fixture(scope="module")
def othello() -> ModuleType:
    return _load("othello")


# ----------------------------------------------------------------------------- game rules


def test_othello_rules(othello: ModuleType) -> None:
    board = othello.start_board()
    black_moves = sorted(othello.square_name(*move) for move in othello.legal_moves(board, othello.BLACK))
    assert black_moves == ["c4", "d3", "e6", "f5"]
    after = othello.play(board, othello.BLACK, *othello.parse_square("f5"))
    assert after[othello.parse_square("e5")] == othello.BLACK  # e5 flipped
    assert (board == othello.start_board()).all()  # play() returns a new board
    with pytest.raises(ValueError, match="not a legal move"):
        othello.play(board, othello.BLACK, *othello.parse_square("a1"))
    position, player = othello.position_after(othello.OPENING)
    assert player == othello.WHITE and int((position != 0).sum()) == 4 + len(othello.OPENING)
    planes = othello.encode(position, player)
    assert planes.shape == (1, 3, 8, 8)
    assert planes[0, 0].sum() == (position == othello.WHITE).sum()  # own stones: white's
    assert planes[0, 2].sum() == len(othello.legal_moves(position, player))


# ---------------------------------------------------------------------------------- main


def test_othello_main_writes_the_png(othello: ModuleType, tmp_path: Path) -> None:
    result = othello.main(out=tmp_path / "out" / "othello.png", square=SQUARE, verbose=False)
    path = result["path"]
    assert path.is_file()
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        assert picture.size == result["size"]
        width, height = picture.size
    # five board-sized cells per row, two rows, plus labels, title and padding
    assert N_COLUMNS * BOARD < width < N_COLUMNS * BOARD + 400
    assert N_ROWS * BOARD < height < N_ROWS * BOARD + 200
    for key in ("value_relevance", "move_relevance", "value_by_plane", "move_by_plane"):
        relevance = result[key]
        assert relevance.shape == (1, 3, 8, 8)
        assert torch.isfinite(relevance).all() and relevance.abs().sum() > 0
    assert result["value"].shape == (1, 1) and result["policy"].shape == (1, 65)
    assert result["move_name"] != "pass"
    row, col = divmod(result["move"], 8)
    assert result["planes"][0, 2, row, col] == 1  # the explained move is a legal one


def test_othello_relevance_conserves_without_biases(othello: ModuleType, tmp_path: Path) -> None:
    """No biases: the value's and the move logit's relevance sum to them (flat and z+ first layer)."""
    result = othello.main(out=tmp_path / "othello.png", zero_biases=True, verbose=False)
    value = result["value"].sum()
    logit = result["policy"][0, result["move"]]
    for relevance in (result["value_relevance"], result["value_by_plane"]):
        torch.testing.assert_close(relevance.sum(), value, rtol=1e-4, atol=1e-7)
    for relevance in (result["move_relevance"], result["move_by_plane"]):
        torch.testing.assert_close(relevance.sum(), logit, rtol=1e-4, atol=1e-7)
    # z+ in the first layer: a plane's relevance sits only where that plane has a one
    planes = result["planes"]
    assert (result["value_by_plane"][planes == 0] == 0).all()


def test_othello_leaves_the_model_unchanged(othello: ModuleType) -> None:
    model = othello.build_model(seed=3)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    attributes = set(vars(model)) | {key for module in model.modules() for key in vars(module)}
    planes = othello.encode(*othello.position_after(othello.OPENING))
    with torch.no_grad():
        expected = model(planes)
    value, _ = othello.explain_value(model, planes)
    policy, _ = othello.explain_move(model, planes, 19)
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert hooks_left(model) == []
    assert {key for module in model.modules() for key in vars(module)} | set(vars(model)) == attributes
    assert not model.training
    torch.testing.assert_close(value, expected["value"])
    torch.testing.assert_close(policy, expected["policy"])


def test_timm_models_example() -> None:
    """examples/timm_models.py, where timm is installed (it is no test dependency): skipped otherwise."""
    pytest.importorskip("timm")
    timm_models = _load("timm_models")
    results = timm_models.main(["resnet18"], size=32)
    for result in results["resnet18"].values():
        assert result["same output"] and result["restored"] and result["finite"]
    assert results["resnet18"]["EpsilonGammaBox"]["conservation error"] < 1e-6


def test_transformers_models_example() -> None:
    """examples/transformers_models.py, where transformers is installed (no test dependency): skipped otherwise.

    GPT-2 (``gelu_new``, ``Conv1D``), Llama (grouped-query attention, RMSNorm, SwiGLU), Mixtral
    (experts added back with ``index_add_``), BLOOM (a GELU in a custom autograd function), and
    in float32 Qwen3-MoE (transformers' default experts, ``torch._grouped_mm``) and Phi-MoE (a
    router that returns a tuple), FNet (Fourier token mixing), ESM (an exact GELU written out
    with ``erf``) and MobileBERT (its trigram input, padded copies concatenated before the first
    dense layer, which EpsilonPlusFlat's flat rule must keep off the padding) conserve; relevance
    per token has one value per token.
    """
    pytest.importorskip("transformers")
    transformers_models = _load("transformers_models")
    results = transformers_models.main(["gpt2", "llama", "mixtral", "bloom", "qwen3_moe", "phimoe", "fnet", "esm", "mobilebert"])
    for model in results.values():
        for result in model.values():
            assert result["same output"] and result["restored"] and result["finite"] and not result["warnings"]
            assert result["conservation error"] < 1e-6
    model = transformers_models._small("gpt2").double().eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    logits, relevance = transformers_models.token_relevance(model, ids)
    assert logits.shape == (2, 50) and relevance.shape == (2, 5) and torch.isfinite(relevance).all()
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # left padding: those queries attend to nothing
    _, relevance = transformers_models.token_relevance(model, ids, attention_mask=mask)
    assert torch.isfinite(relevance).all() and not relevance[1, :2].any() and relevance[1, 2:].any()
    for name in ("t5", "bart"):  # encoder and decoder ids explained together (BART's positions take the ids)
        error, warnings = transformers_models.seq2seq_conservation(name)
        assert error < 1e-8 and not warnings, (name, error, warnings)


def test_sentiment_example_finds_the_deciding_words(tmp_path: Path) -> None:
    """Both toy classifiers, trained in-process from token ids, put the most relevance on a
    sentiment word of the class they predict, and conserve relevance (no biases)."""
    sentiment = _load("sentiment")
    results = sentiment.main(steps=200, html=tmp_path / "sentiment.html")
    page = (tmp_path / "sentiment.html").read_text()
    assert page.count("<p>") == 2 * 12 and page.count("<span") == 2 * 12 * (sentiment.LENGTH + 1)
    for name, result in results.items():
        assert result["accuracy"] > 0.95, name
        assert result["top token decides"] > 0.9, name
        assert result["conservation error"] < 1e-3, name
        assert result["word deletion AOPC"] > 1.5 * result["random order AOPC"] > 0, name
    ids, labels = sentiment.sentences(5, torch.Generator().manual_seed(3))
    assert ids.shape == (5, sentiment.LENGTH) and set(labels.tolist()) <= {0, 1}


def test_graph_network_example_finds_the_group() -> None:
    """The graph convolutional network, trained in-process, puts the most relevance on an atom of
    the ``A``-``B`` bond that makes the class, and conserves relevance (no biases)."""
    graph_network = _load("graph_network")
    results = graph_network.main(steps=300, tests=60)
    assert results["accuracy"] > 0.9
    assert results["top atom in the group"] > 0.8
    assert results["conservation error"] < 1e-2  # (float32; 1e-6 stabilisers next to logits of 0.2 and more)
    graph = graph_network.random_graph(torch.Generator().manual_seed(1))
    assert graph.bonds.shape[0] == 2 and graph.label == int(bool(graph.group_atoms()))

