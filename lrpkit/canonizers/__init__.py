"""Canonizers bring a model into a form LRP can explain, reversibly.

Examples
--------
>>> from lrpkit import canonizers
>>> canonizers.default_canonizers()  # doctest: +ELLIPSIS
[...]
"""

from __future__ import annotations

from .base import CallbackHandle, Canonizer, CompositeCanonizer, Handle, undo_all


def default_canonizers() -> list[Canonizer]:
    """The canonizers every composite uses when ``canonizers`` is not given."""
    return []


__all__ = [
    "CallbackHandle",
    "Canonizer",
    "CompositeCanonizer",
    "Handle",
    "default_canonizers",
    "undo_all",
]
