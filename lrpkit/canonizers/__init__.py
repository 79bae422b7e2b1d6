"""Canonizers bring a model into a form LRP can explain, reversibly.

Examples
--------
>>> from lrpkit import canonizers
>>> canonizers.default_canonizers()  # doctest: +ELLIPSIS
[...]
"""

from __future__ import annotations

from .base import CallbackHandle, Canonizer, CompositeCanonizer, Handle, RuleBinding, undo_all
from .batchnorm import MergeBatchNorm, MergeHandle, NamedMergeBatchNorm, find_batchnorm_pairs
from .functional import FunctionalCapture, default_op_rules


def default_canonizers(stabilizer: float = 1e-6) -> list[Canonizer]:
    """The canonizers every composite uses when ``canonizers`` is not given.

    :class:`MergeBatchNorm` merges every ``Conv/ConvTranspose/Linear -> BatchNorm`` pair the model executes;
    :class:`FunctionalCapture` names the functional calls (``x + y``, ``torch.relu``, ...) and
    gives them rules, with ``stabilizer`` where the composite gives them none (products,
    normalisations, attention: :func:`default_op_rules`). A preset passes its own ``stabilizer``.
    """
    return [MergeBatchNorm(), FunctionalCapture(stabilizer=stabilizer)]


__all__ = [
    "CallbackHandle",
    "Canonizer",
    "CompositeCanonizer",
    "FunctionalCapture",
    "Handle",
    "MergeBatchNorm",
    "MergeHandle",
    "NamedMergeBatchNorm",
    "RuleBinding",
    "default_canonizers",
    "default_op_rules",
    "find_batchnorm_pairs",
    "undo_all",
]
