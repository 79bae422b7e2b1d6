"""Shared fixtures: the 8x8 digits and the small digits models, trained once per session.

Training happens in float32 (a few seconds on two CPU cores); the tests get float64 copies so
that comparisons can be tight. Every model fixture hands out a *fresh* deep copy, so a test
that changes a model (zeroes its biases, say) cannot leak into another test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

#: Number of test digits the integration tests explain at once.
DIGITS_BATCH_SIZE = 8


def _seeded(factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``factory()`` with parameters drawn from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


@pytest.fixture(scope="session")
def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_train, y_train, x_test, y_test`` in float32, images (N, 1, 8, 8) in [0, 1]."""
    from lrpkit.digits import load_digits_tensors

    return load_digits_tensors(dtype=torch.float32)


@pytest.fixture(scope="session")
def trained_digits_cnn32(digits_data) -> nn.Module:
    """The digits CNN trained once per session in float32 (do not modify; use ``digits_cnn``)."""
    from lrpkit.digits import DigitsCNN, train

    x_train, y_train, _, _ = digits_data
    return train(_seeded(DigitsCNN, 0), x_train, y_train, epochs=20, seed=0)


@pytest.fixture(scope="session")
def trained_digits_mlp32(digits_data) -> nn.Module:
    """The digits MLP trained once per session in float32 (do not modify; use ``digits_mlp``)."""
    from lrpkit.digits import DigitsMLP, train

    x_train, y_train, _, _ = digits_data
    return train(_seeded(DigitsMLP, 0), x_train, y_train, epochs=30, seed=0)


@pytest.fixture
def digits_cnn(trained_digits_cnn32) -> nn.Module:
    """A fresh float64 copy of the trained digits CNN, in eval mode."""
    return copy.deepcopy(trained_digits_cnn32).double().eval()


@pytest.fixture
def digits_mlp(trained_digits_mlp32) -> nn.Module:
    """A fresh float64 copy of the trained digits MLP, in eval mode."""
    return copy.deepcopy(trained_digits_mlp32).double().eval()


@pytest.fixture
def digits_model(request) -> nn.Module:
    """Indirectly parametrised digits model: ``"cnn"`` or ``"mlp"`` (a fresh float64 copy)."""
    return request.getfixturevalue({"cnn": "digits_cnn", "mlp": "digits_mlp"}[request.param])


@pytest.fixture(scope="session")
def digits_batch(digits_data) -> torch.Tensor:
    """The first ``DIGITS_BATCH_SIZE`` test digits in float64, shape (8, 1, 8, 8), values in [0, 1]."""
    _, _, x_test, _ = digits_data
    return x_test[:DIGITS_BATCH_SIZE].double().clone()


@pytest.fixture(scope="session")
def digits_labels(digits_data) -> torch.Tensor:
    """Labels of ``digits_batch``."""
    _, _, _, y_test = digits_data
    return y_test[:DIGITS_BATCH_SIZE].clone()
