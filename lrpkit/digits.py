"""Small models on scikit-learn's 8x8 handwritten digits.

The digits ship with scikit-learn (no download), so the demo and the test-suite can train
real models in-process in a few seconds. scikit-learn is only a demo/test dependency: it is
imported lazily by :func:`load_digits_tensors`.

Examples
--------
>>> from lrpkit.digits import DigitsCNN, load_digits_tensors, train, accuracy
>>> x_train, y_train, x_test, y_test = load_digits_tensors()
>>> model = train(DigitsCNN(), x_train, y_train)          # doctest: +SKIP
>>> accuracy(model, x_test, y_test) > 0.95                # doctest: +SKIP
True
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DigitsCNN",
    "DigitsMLP",
    "accuracy",
    "cache_directory",
    "cpu_threads",
    "load_digits_tensors",
    "pretrained_cnn",
    "train",
    "trained_cnn",
    "trained_mlp",
]

CNN_WEIGHTS_FILE = "digits_cnn.pt"
"""File name of the cached CNN weights inside :func:`cache_directory`."""

N_CLASSES = 10
IMAGE_SIZE = 8
N_DIGITS = 1797


def _read_bundled_csv() -> np.ndarray | None:
    """The rows of scikit-learn's ``digits.csv.gz`` read without importing scikit-learn.

    ``import sklearn`` pulls in SciPy and costs about a second; the file that
    ``sklearn.datasets.load_digits`` parses is read here directly when it is where
    scikit-learn keeps it. ``None`` when it is not (then the public loader is used).
    """
    try:
        spec = importlib.util.find_spec("sklearn")  # locates the package, runs none of it
    except (ImportError, ValueError, AttributeError):  # e.g. blocked in sys.modules
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            try:
                rows = np.loadtxt(path, delimiter=",", dtype=np.float64)
            except (OSError, ValueError):
                return None
            return rows if rows.shape == (N_DIGITS, 65) else None
    return None


def _load_with_sklearn() -> tuple[np.ndarray, np.ndarray]:
    """Images and labels through the public ``sklearn.datasets.load_digits``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "lrpkit.digits needs scikit-learn for its bundled 8x8 digits data set: "
            "pip install scikit-learn"
        ) from error
    bunch = load_digits()
    return np.asarray(bunch.images, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)


@functools.lru_cache(maxsize=2)
def _digits_arrays(fast: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read the bundled digits once per process: images (N, 8, 8) in 0..16 and labels (N,)."""
    rows = _read_bundled_csv() if fast else None
    if rows is not None:
        images = rows[:, :-1].reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        labels = rows[:, -1].astype(np.int64)
    else:
        images, labels = _load_with_sklearn()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_digits_tensors(
    dtype: torch.dtype = torch.float32,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load scikit-learn's 8x8 digits as image tensors with a deterministic split.

    Parameters
    ----------
    dtype
        Floating point dtype of the images.
    test_fraction
        Fraction of the 1797 samples put into the test split, in (0, 1).
    seed
        Seed of the permutation that decides the split; the same seed gives the same split.

    Returns
    -------
    x_train, y_train, x_test, y_test
        Images shaped (N, 1, 8, 8) scaled to [0, 1] (pixel / 16) and int64 labels shaped (N,).

    Raises
    ------
    ImportError
        If scikit-learn is not installed.

    Examples
    --------
    >>> x_train, y_train, x_test, y_test = load_digits_tensors()
    >>> x_train.shape, x_test.shape
    (torch.Size([1348, 1, 8, 8]), torch.Size([449, 1, 8, 8]))
    >>> float(x_train.min()), float(x_train.max())
    (0.0, 1.0)
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    images, labels = _digits_arrays()
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test_index, train_index = order[:n_test], order[n_test:]

    x = torch.tensor(images / 16.0, dtype=dtype).unsqueeze(1)
    y = torch.tensor(labels, dtype=torch.int64)
    train_index_t = torch.from_numpy(train_index)
    test_index_t = torch.from_numpy(test_index)
    return x[train_index_t], y[train_index_t], x[test_index_t], y[test_index_t]


class DigitsCNN(nn.Sequential):
    """A small convolutional network for 1x8x8 digits, built only from modules.

    Layers (named children): ``conv1`` 1->16, ``relu1``, ``conv2`` 16->32, ``relu2``,
    ``pool`` (2x2 average pooling, 8x8 -> 4x4), ``conv3`` 32->32, ``relu3``, ``flatten``,
    ``fc1`` 512->64, ``relu4``, ``fc2`` 64->10. Every convolution is 3x3 with padding 1.
    There are no functional calls in the forward pass, so every operation is a module that a
    composite can map.

    Examples
    --------
    >>> model = DigitsCNN()
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(1, 16, kernel_size=3, padding=1)),
                    ("relu1", nn.ReLU()),
                    ("conv2", nn.Conv2d(16, 32, kernel_size=3, padding=1)),
                    ("relu2", nn.ReLU()),
                    ("pool", nn.AvgPool2d(2)),
                    ("conv3", nn.Conv2d(32, 32, kernel_size=3, padding=1)),
                    ("relu3", nn.ReLU()),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(32 * 4 * 4, 64)),
                    ("relu4", nn.ReLU()),
                    ("fc2", nn.Linear(64, N_CLASSES)),
                ]
            )
        )


class DigitsMLP(nn.Sequential):
    """A small fully connected network for 1x8x8 digits.

    Layers (named children): ``flatten``, ``fc1`` 64->64, ``relu1``, ``fc2`` 64->32,
    ``relu2``, ``fc3`` 32->10.

    Examples
    --------
    >>> model = DigitsMLP()
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(IMAGE_SIZE * IMAGE_SIZE, 64)),
                    ("relu1", nn.ReLU()),
                    ("fc2", nn.Linear(64, 32)),
                    ("relu2", nn.ReLU()),
                    ("fc3", nn.Linear(32, N_CLASSES)),
                ]
            )
        )


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


@contextlib.contextmanager
def cpu_threads(num_threads: int | None = 1) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(num_threads)``, restoring the count after.

    The digits models are so small that one thread is the fastest, and on a CPU shared
    with other processes several OpenMP threads can make each tiny operation a hundred
    times slower (they spin and wait for each other). ``None`` changes nothing.

    Examples
    --------
    >>> with cpu_threads(1):
    ...     torch.get_num_threads()
    1
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous)


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int = 30,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    num_threads: int | None = 1,
) -> nn.Module:
    """Train a classifier in place with Adam and cross-entropy on minibatches.

    The minibatch order comes from a private generator seeded with ``seed``; the global
    random state is saved and restored, so calling this has no effect on other code's random
    numbers. The parameters the model starts from are the ones it has (seed its construction
    for a fully reproducible run, as :func:`trained_cnn` does).

    Parameters
    ----------
    model
        The classifier; trained on the device its parameters live on.
    x, y
        Inputs (N, ...) and int64 labels (N,).
    epochs
        Passes over the data.
    seed
        Seed of the minibatch shuffling.
    lr
        Adam's learning rate.
    batch_size
        Samples per optimisation step.
    weight_decay
        Adam's (L2) weight decay.
    num_threads
        CPU threads for the duration of training (restored afterwards). One thread is the
        fastest for these tiny models and does not slow down by orders of magnitude when the
        CPU is shared with other processes, as several OpenMP threads do; ``None`` keeps
        PyTorch's setting.

    Returns
    -------
    nn.Module
        The same ``model``, trained and switched to eval mode.

    Examples
    --------
    >>> x_train, y_train, x_test, y_test = load_digits_tensors()
    >>> model = train(DigitsMLP(), x_train, y_train, epochs=40)   # doctest: +SKIP
    """
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} != {len(y)}")
    device = _model_device(model)
    x, y = x.to(device), y.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_function = nn.CrossEntropyLoss()

    with cpu_threads(num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator).to(device)
            for batch in order.split(batch_size):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_function(model(x[batch]), y[batch])
                loss.backward()
                optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of samples whose argmax prediction equals the label.

    Examples
    --------
    >>> accuracy(DigitsMLP(), torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.int64)) <= 1
    True
    """
    device = _model_device(model)
    predictions = model(x.to(device)).argmax(dim=1)
    return float((predictions == y.to(device)).float().mean())


def _seeded(factory: type[nn.Module], seed: int) -> nn.Module:
    """Construct ``factory()`` with parameters drawn from ``seed``, leaving global RNG alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def trained_cnn(seed: int = 0, epochs: int = 20) -> DigitsCNN:
    """A :class:`DigitsCNN` initialised and trained from ``seed`` on the training split.

    Deterministic for a given seed on a given machine/PyTorch build; about 2-3 seconds on
    one CPU core. Test accuracy is above 95 %.

    Examples
    --------
    >>> model = trained_cnn()   # doctest: +SKIP
    """
    x_train, y_train, _, _ = load_digits_tensors()
    model = _seeded(DigitsCNN, seed)
    train(model, x_train, y_train, epochs=epochs, seed=seed, lr=3e-3)
    return model


def trained_mlp(seed: int = 0, epochs: int = 30) -> DigitsMLP:
    """A :class:`DigitsMLP` initialised and trained from ``seed`` on the training split.

    Test accuracy is above 93 %; well under a second on one CPU core.

    Examples
    --------
    >>> model = trained_mlp()   # doctest: +SKIP
    """
    x_train, y_train, _, _ = load_digits_tensors()
    model = _seeded(DigitsMLP, seed)
    train(model, x_train, y_train, epochs=epochs, seed=seed, lr=3e-3)
    return model


def cache_directory() -> Path:
    """Where lrpkit caches trained weights.

    ``$LRPKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/lrpkit``, else ``~/.cache/lrpkit``.
    The directory is not created here.
    """
    explicit = os.environ.get("LRPKIT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lrpkit"


def _save_atomically(state_dict: dict[str, Tensor], path: Path) -> None:
    """Write ``state_dict`` to ``path`` via a temporary file, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(state_dict, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _load_weights(model: nn.Module, path: Path) -> bool:
    """Load ``path`` into ``model``; ``False`` (with a note on stderr) if it is unusable."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict)
    except Exception as error:  # corrupt file, other architecture, ...
        print(f"lrpkit: ignoring unusable cached weights {path} ({error})", file=sys.stderr)
        return False
    return True


def pretrained_cnn(cache_dir: str | os.PathLike[str] | None = None) -> DigitsCNN:
    """The digits CNN, loaded from the cache or trained (and cached) on first use.

    Parameters
    ----------
    cache_dir
        Directory holding ``digits_cnn.pt``; default :func:`cache_directory`.

    Returns
    -------
    DigitsCNN
        On the CPU, in eval mode.

    Notes
    -----
    Training takes a few seconds and is announced on stderr. The weights are read with
    ``torch.load(..., weights_only=True)``; an unreadable or mismatching file is retrained
    and overwritten.

    Examples
    --------
    >>> model = pretrained_cnn()   # doctest: +SKIP
    >>> model(torch.zeros(1, 1, 8, 8)).shape   # doctest: +SKIP
    torch.Size([1, 10])
    """
    directory = Path(cache_dir).expanduser() if cache_dir is not None else cache_directory()
    path = directory / CNN_WEIGHTS_FILE
    model = DigitsCNN()
    if path.is_file() and _load_weights(model, path):
        return model.eval()

    print(f"lrpkit: training the digits CNN (a few seconds), caching it in {path}", file=sys.stderr)
    model = trained_cnn(seed=0)
    _save_atomically(model.state_dict(), path)
    return model
