"""The canonizer protocol: reversible rewrites applied before rules are attached.

A canonizer's :meth:`Canonizer.apply` changes a model (merges BatchNorm, captures functional calls,
...) and returns handles whose ``remove()`` undoes exactly what it did. Composites push every
handle on an undo stack as soon as it exists, so a failure anywhere restores the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from torch import nn

from ..core import Rule, Session


@runtime_checkable
class Handle(Protocol):
    """Anything that can undo one change (``torch.utils.hooks.RemovableHandle`` qualifies)."""

    def remove(self) -> None:
        """Undo the change."""


class CallbackHandle:
    """A :class:`Handle` that runs ``undo`` once when removed."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Callable[[], None] | None = undo

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()


@dataclass
class RuleBinding:
    """What a composite tells the canonizers that place rules themselves (functional capture).

    Attributes
    ----------
    rule_for
        ``(name, module) -> Rule | None``: the composite's choice for a name and a (pseudo-)module.
    hooked
        The modules that carry a rule hook (their inner calls belong to their rule).
    session
        The composite's registration (to refuse a backward after the context closed).
    unchecked
        Parameters of modules with no rule of their own (``id(parameter) -> "'name' (Type)"``),
        for a canonizer that sees how they are used (:meth:`Canonizer.checks_parameter_use`).
    unchecked_modules
        Those modules (``id(module) -> "'name' (Type)"``).
    report_uncovered
        Called once, after the first forward pass, with the modules among them whose parameters
        went into a call that keeps its plain gradient, or that have no children, ran, and whose
        parameters went into no call the canonizer saw (a module that did not run and whose
        parameters nothing used, such as a text model's token embedding when it is given
        embeddings, is left out).
    report_custom_functions
        Called once, after the first forward pass, with the modules without a rule whose output
        a custom ``torch.autograd.Function`` (not lrpkit's) computed (``"'name' (Type: output of
        Function.apply)"``): their relevance is that Function's backward.
    """

    rule_for: Callable[[str, nn.Module], Rule | None]
    hooked: "set[int]"
    session: Session
    unchecked: "dict[int, str]" = field(default_factory=dict)
    unchecked_modules: "dict[int, str]" = field(default_factory=dict)
    report_uncovered: Callable[[list[str]], None] | None = None
    report_custom_functions: Callable[[list[str]], None] | None = None


class Canonizer:
    """Base class of canonizers: ``apply(model)`` changes the model and returns undo handles.

    ``apply`` must leave the model unchanged if it raises (undo its own partial work).
    """

    def apply(self, model: nn.Module) -> list[Handle]:
        raise NotImplementedError

    def bind(self, model: nn.Module, binding: RuleBinding) -> list[Handle]:
        """Learn the composite's rules after they are attached (for canonizers that place rules)."""
        return []

    def explains(self, module: nn.Module) -> bool:
        """Whether this canonizer gives ``module``'s computation rules, so it needs no rule of its own."""
        return False

    def checks_parameter_use(self) -> bool:
        """Whether this canonizer sees, while the model runs, which calls the parameters go into.

        The composite then leaves the modules with parameters and no rule to it
        (:attr:`RuleBinding.unchecked`) instead of warning about each when the context is entered.
        """
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def undo_all(handles: Iterable[Handle]) -> None:
    """Remove ``handles`` last-first; every handle is tried even if one raises (the first error wins)."""
    error: BaseException | None = None
    for handle in reversed(list(handles)):
        try:
            handle.remove()
        except BaseException as exc:  # noqa: BLE001 - keep undoing, re-raise below
            error = error or exc
    if error is not None:
        raise error


class CompositeCanonizer(Canonizer):
    """Several canonizers applied in order as one; undone in reverse order.

    Parameters
    ----------
    canonizers
        The canonizers to apply, first to last.
    """

    def __init__(self, canonizers: Iterable[Canonizer]) -> None:
        self.canonizers = list(canonizers)

    def apply(self, model: nn.Module) -> list[Handle]:
        handles: list[Handle] = []
        try:
            for canonizer in self.canonizers:
                handles.extend(canonizer.apply(model))
        except BaseException:
            undo_all(handles)
            raise
        return handles

    def bind(self, model: nn.Module, binding: RuleBinding) -> list[Handle]:
        handles: list[Handle] = []
        try:
            for canonizer in self.canonizers:
                handles.extend(canonizer.bind(model, binding))
        except BaseException:
            undo_all(handles)
            raise
        return handles

    def explains(self, module: nn.Module) -> bool:
        return any(canonizer.explains(module) for canonizer in self.canonizers)

    def checks_parameter_use(self) -> bool:
        return any(canonizer.checks_parameter_use() for canonizer in self.canonizers)

    def __repr__(self) -> str:
        return f"CompositeCanonizer({self.canonizers!r})"
