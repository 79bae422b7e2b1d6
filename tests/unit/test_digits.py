"""The digits data and models in lrpkit.digits: loading, training, caching."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn", reason="lrpkit.digits needs scikit-learn")

from lrpkit import digits  # noqa: E402
from lrpkit.digits import (  # noqa: E402
    DigitsCNN,
    DigitsMLP,
    accuracy,
    load_digits_tensors,
    pretrained_cnn,
    train,
)

N_DIGITS = 1797


# ---------------------------------------------------------------------------------- data


def test_load_shapes_ranges_and_types() -> None:
    x_train, y_train, x_test, y_test = load_digits_tensors()
    assert x_train.shape[1:] == (1, 8, 8) and x_test.shape[1:] == (1, 8, 8)
    assert len(x_train) == len(y_train) and len(x_test) == len(y_test)
    assert len(x_train) + len(x_test) == N_DIGITS
    assert abs(len(x_test) - 0.25 * N_DIGITS) <= 1
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    assert set(y_train.tolist()) == set(range(10)) == set(y_test.tolist())
    # pixel / 16: every value is a multiple of 1/16
    assert torch.equal(x_test * 16, (x_test * 16).round())


def test_load_is_deterministic_and_seeded() -> None:
    first = load_digits_tensors(seed=0)
    second = load_digits_tensors(seed=0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    other = load_digits_tensors(seed=1)
    assert not torch.equal(first[1], other[1])


def test_load_options() -> None:
    x_train, _, x_test, _ = load_digits_tensors(dtype=torch.float64, test_fraction=0.5)
    assert x_train.dtype == torch.float64
    assert abs(len(x_test) - len(x_train)) <= 1
    with pytest.raises(ValueError):
        load_digits_tensors(test_fraction=1.0)


def test_missing_scikit_learn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    digits._digits_arrays.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes every sklearn import fail
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(ImportError, match="pip install scikit-learn"):
            load_digits_tensors()
    finally:
        digits._digits_arrays.cache_clear()


def test_fast_reader_matches_scikit_learn_loader() -> None:
    fast_images, fast_labels = digits._digits_arrays(fast=True)
    images, labels = digits._digits_arrays(fast=False)
    np.testing.assert_array_equal(fast_images, images)
    np.testing.assert_array_equal(fast_labels, labels)
    assert images.shape == (N_DIGITS, 8, 8) and labels.dtype == np.int64


# -------------------------------------------------------------------------------- models


@pytest.mark.parametrize("factory", [DigitsCNN, DigitsMLP])
def test_models_are_plain_module_graphs(factory: type[nn.Module]) -> None:
    model = factory()
    assert isinstance(model, nn.Sequential)
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)
    kinds = {type(child) for child in model.children()}
    assert nn.Flatten in kinds and nn.ReLU in kinds
    # every child is a leaf: a composite sees every operation as a module
    assert all(not list(child.children()) for child in model.children())


def test_cnn_layer_names() -> None:
    names = [name for name, _ in DigitsCNN().named_children()]
    assert names[0] == "conv1" and names[-1] == "fc2" and "flatten" in names


def test_mlp_trains_to_accuracy_deterministically() -> None:
    x_train, y_train, x_test, y_test = load_digits_tensors()
    global_state = torch.get_rng_state()
    first = digits.trained_mlp(seed=0)
    second = digits.trained_mlp(seed=0)
    assert torch.equal(torch.get_rng_state(), global_state)  # no side effect on global RNG
    assert not first.training
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    assert accuracy(first, x_test, y_test) >= 0.93


def test_train_returns_same_model_in_eval_mode() -> None:
    x_train, y_train, _, _ = load_digits_tensors()
    model = DigitsMLP()
    trained = train(model, x_train[:64], y_train[:64], epochs=1)
    assert trained is model and not trained.training
    with pytest.raises(ValueError):
        train(model, x_train[:3], y_train[:2], epochs=1)


# ---------------------------------------------------------------------- cache and CNN


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory in which ``pretrained_cnn`` has trained (once for this module)."""
    return tmp_path_factory.mktemp("lrpkit-cache")


@pytest.fixture(scope="module")
def first_cnn(cached: Path) -> DigitsCNN:
    return pretrained_cnn(cache_dir=cached)


def test_pretrained_cnn_reaches_accuracy(first_cnn: DigitsCNN) -> None:
    _, _, x_test, y_test = load_digits_tensors()
    assert isinstance(first_cnn, DigitsCNN) and not first_cnn.training
    assert accuracy(first_cnn, x_test, y_test) >= 0.95


def test_pretrained_cnn_caches_and_reloads(
    cached: Path, first_cnn: DigitsCNN, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert (cached / digits.CNN_WEIGHTS_FILE).is_file()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("pretrained_cnn trained although the weights were cached")

    monkeypatch.setattr(digits, "trained_cnn", no_training)
    monkeypatch.setattr(digits, "train", no_training)
    second = pretrained_cnn(cache_dir=cached)
    assert "training" not in capsys.readouterr().err
    x = load_digits_tensors()[2][:32]
    with torch.no_grad():
        assert torch.equal(first_cnn(x), second(x))


def test_pretrained_cnn_announces_training_and_uses_env(
    first_cnn: DigitsCNN, cached: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # pretend to train (quickly): hand out the module's model instead of training again
    monkeypatch.setattr(digits, "trained_cnn", lambda seed=0: first_cnn)
    monkeypatch.setenv("LRPKIT_CACHE", str(tmp_path / "env-cache"))
    pretrained_cnn()
    assert "training" in capsys.readouterr().err
    assert (tmp_path / "env-cache" / digits.CNN_WEIGHTS_FILE).is_file()


def test_corrupt_cache_is_retrained(
    first_cnn: DigitsCNN, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / digits.CNN_WEIGHTS_FILE).write_bytes(b"not a checkpoint")
    monkeypatch.setattr(digits, "trained_cnn", lambda seed=0: first_cnn)
    model = pretrained_cnn(cache_dir=tmp_path)
    err = capsys.readouterr().err
    assert "ignoring unusable cached weights" in err and "training" in err
    assert model is first_cnn
    reloaded = pretrained_cnn(cache_dir=tmp_path)  # now a valid file
    assert torch.equal(reloaded.fc2.weight, first_cnn.fc2.weight)


def test_cache_directory_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LRPKIT_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert digits.cache_directory() == tmp_path / "explicit"
    monkeypatch.delenv("LRPKIT_CACHE")
    assert digits.cache_directory() == tmp_path / "xdg" / "lrpkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert digits.cache_directory() == tmp_path / "home" / ".cache" / "lrpkit"
