"""Canonizers bring a model into a form LRP can explain, reversibly.

Examples
--------
>>> from lrpkit import canonizers
>>> canonizers.default_canonizers()  # doctest: +ELLIPSIS
[...]
"""

from __future__ import annotations

from .base import CallbackHandle, Canonizer, CompositeCanonizer, Handle, undo_all
from .batchnorm import MergeBatchNorm, MergeHandle, NamedMergeBatchNorm, find_batchnorm_pairs


def default_canonizers() -> list[Canonizer]:
    """The canonizers every composite uses when ``canonizers`` is not given.

    :class:`MergeBatchNorm`: every ``Conv/Linear -> BatchNorm`` pair the model executes is merged
    (``FunctionalCapture`` joins it later).
    """
    return [MergeBatchNorm()]


__all__ = [
    "CallbackHandle",
    "Canonizer",
    "CompositeCanonizer",
    "Handle",
    "MergeBatchNorm",
    "MergeHandle",
    "NamedMergeBatchNorm",
    "default_canonizers",
    "find_batchnorm_pairs",
    "undo_all",
]
