"""Composites: which rule each module of a model gets, and the transactional context.

A composite maps ``(ctx, name, module)`` to a rule (or ``None``: plain gradient). Its
:meth:`Composite.context` applies the canonizers, attaches the rules and, whatever happens in
between, leaves the model exactly as it was: same parameters and buffers bit for bit, no hooks,
no added attributes.

Examples
--------
>>> import torch
>>> from lrpkit import rules
>>> from lrpkit.composites import LayerMapComposite, NameMapComposite
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> by_type = LayerMapComposite([(torch.nn.Linear, rules.Epsilon())])
>>> by_name = NameMapComposite([(["0"], rules.Flat()), ("2", rules.Epsilon())])
>>> with by_name.context(model):
...     output = model(torch.rand(1, 4, requires_grad=True))
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..canonizers import Canonizer, CompositeCanonizer, RuleBinding, default_canonizers, undo_all
from ..core import Rule, RuleChoice, RuleHook, Session, attach
from ..ops import hooks_are_suspended
from ..rectified import rectify_in_place

Ctx = dict[str, Any]
ModuleTypes = Union[type, tuple[type, ...]]
LayerMap = Sequence[tuple[ModuleTypes, Rule]]
NamePattern = Union[str, Callable[[str, nn.Module], bool]]
NameMap = Sequence[tuple[Union[NamePattern, Sequence[NamePattern]], Rule]]
Choice = Union[Rule, "FirstLayerChoice", None]


class UncoveredModuleWarning(UserWarning):
    """A module with parameters gets no rule (its relevance is its plain gradient).

    Also: a module without a rule returns the output of a custom ``torch.autograd.Function``
    (its relevance is that Function's backward), found in the first forward pass when a
    canonizer sees the calls.

    Without a canonizer that sees the calls (:class:`~lrpkit.canonizers.FunctionalCapture`), issued
    when the context is entered; with one, after the first forward pass, and only for modules
    whose parameters went into a call that keeps its gradient (or into no call it saw).
    """


# Modules of every model currently inside a composite's context (no attribute is added to them).
_MODULES_IN_CONTEXT: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def in_context(module: nn.Module) -> bool:
    """Whether ``module`` is inside a composite's context (its rules are attached now).

    Examples
    --------
    >>> import torch
    >>> from lrpkit import composites
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> with composites.EpsilonPlus().context(model):
    ...     inside = composites.in_context(model)
    >>> inside, composites.in_context(model)
    (True, False)
    """
    return module in _MODULES_IN_CONTEXT


class FirstLayerChoice:
    """Gives ``first`` to whichever candidate module runs first in a forward pass, ``other`` to the rest.

    All candidates of one registration share ``state``; the decision is taken at the first
    forward call and kept until the context closes.
    """

    def __init__(self, state: Ctx, first: Rule, other: Rule | None) -> None:
        self.state = state
        self.first = first
        self.other = other

    def __call__(self, module: nn.Module) -> Rule | None:
        if self.state.get("first_layer") is None:
            self.state["first_layer"] = module
        return self.first if self.state["first_layer"] is module else self.other


class Composite:
    """Attach a rule to every module a ``module_map`` chooses, inside a reversible context.

    Parameters
    ----------
    module_map
        ``(ctx, name, module) -> Rule | None``; ``ctx`` is a dict shared by one registration.
        Subclasses override :meth:`module_map` instead.
    canonizers
        Canonizers applied first; ``None`` means :func:`lrpkit.canonizers.default_canonizers`,
        ``[]`` none.
    strict
        Raise instead of warning when a module with parameters gets no rule.
    """

    #: Whether a module with parameters and no rule is worth a warning (False for gradient methods).
    warn_uncovered: bool = True

    def __init__(
        self,
        module_map: Callable[[Ctx, str, nn.Module], Choice] | None = None,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        self._module_map = module_map
        self.canonizers = default_canonizers() if canonizers is None else list(canonizers)
        self.strict = strict
        self._registration: tuple[ExitStack, Session] | None = None
        self._choices: dict[int, RuleChoice] = {}

    def module_map(self, ctx: Ctx, name: str, module: nn.Module) -> Choice:
        """The rule for ``module`` called ``name`` (``None``: plain gradient)."""
        if self._module_map is None:
            raise NotImplementedError(f"{type(self).__name__} has no module_map")
        return self._module_map(ctx, name, module)

    @contextmanager
    def context(self, model: nn.Module) -> Iterator[nn.Module]:
        """Attach the rules to ``model`` for the ``with`` block; always restore the model after.

        Raises
        ------
        RuntimeError
            If ``model`` (or a module of it) is already inside a composite's context.
        """
        self.register(model)
        try:
            yield model
        finally:
            self.remove()

    def register(self, model: nn.Module) -> None:
        """Apply the canonizers and attach the rules; undo with :meth:`remove`."""
        if self._registration is not None:
            raise RuntimeError(
                f"{type(self).__name__} is already registered on a model; call remove() (or leave "
                "its context) before registering it again"
            )
        modules = list(model.modules())
        if any(_is_compiled(module) or isinstance(module, torch.jit.ScriptModule) for module in modules):
            raise TypeError(_compiled_message(model))
        if any(module in _MODULES_IN_CONTEXT for module in modules):
            busy = next(name for name, module in model.named_modules() if module in _MODULES_IN_CONTEXT)
            raise RuntimeError(
                f"module '{busy or type(model).__name__}' is already inside a composite's "
                "context; leave that context before entering another one on the same model"
            )
        stack = ExitStack()
        session = Session()
        try:
            _MODULES_IN_CONTEXT.update(modules)
            stack.callback(_release, modules, session)
            canonizer = CompositeCanonizer(self.canonizers)
            stack.callback(undo_all, canonizer.apply(model))
            ctx: Ctx = {}
            uncovered = self._attach_rules(model, ctx, canonizer, stack, session)
            binding = RuleBinding(
                rule_for=lambda name, op: _resolve(self.module_map(ctx, name, op), op),
                hooked=set(self._choices),
                session=session,
                report_custom_functions=self._report_custom_functions if self.warn_uncovered else None,
            )
            if uncovered and self.warn_uncovered:
                if canonizer.checks_parameter_use():
                    binding.unchecked = {
                        id(param): label for label, module in uncovered for param in module.parameters(recurse=False)
                    }
                    binding.unchecked_modules = {id(module): label for label, module in uncovered}
                    binding.report_uncovered = self._report_uncovered
                else:
                    self._report_uncovered([label for label, _ in uncovered])
            stack.callback(undo_all, canonizer.bind(model, binding))
            _disable_inplace(model, self._choices, stack)
        except BaseException:
            stack.close()
            raise
        self._registration = (stack, session)

    def remove(self) -> None:
        """Detach all rules and undo the canonizers (last change first)."""
        registration, self._registration = self._registration, None
        if registration is not None:
            registration[0].close()

    def rule_of(self, module: nn.Module) -> Rule | None:
        """The rule the registered composite gives ``module`` (``None``: no rule hook)."""
        choose = self._choices.get(id(module))
        return None if choose is None else choose(module)

    def _attach_rules(
        self, model: nn.Module, ctx: Ctx, canonizer: Canonizer, stack: ExitStack, session: Session
    ) -> list[tuple[str, nn.Module]]:
        """Hook each module its rule; the modules with parameters left without one (``"'name' (Type)"``, module)."""
        uncovered = []
        self._choices = {}
        stack.callback(self._choices.clear)
        handles: list[RemovableHandle] = []
        stack.callback(undo_all, handles)
        for name, module in model.named_modules():
            choice = self.module_map(ctx, name, module)
            if choice is None:
                if _needs_rule(module) and not canonizer.explains(module):
                    uncovered.append((f"'{name}' ({type(module).__name__})", module))
                continue
            choose: RuleChoice = choice if isinstance(choice, FirstLayerChoice) else _constant(choice)
            self._choices[id(module)] = choose
            handles.append(attach(module, RuleHook(name, choose, session)))
        return uncovered

    def _report_uncovered(self, labels: list[str]) -> None:
        """Warn (``strict``: raise) that the modules ``labels`` keep their plain gradient."""
        self._warn_or_raise(
            f"{type(self).__name__}: no rule for the module(s) with parameters "
            f"{', '.join(labels)}; their relevance is their plain gradient. Map them to a rule"
        )

    def _report_custom_functions(self, labels: list[str]) -> None:
        """Warn (``strict``: raise) that the modules ``labels`` return or pass on a custom autograd Function's output."""
        self._warn_or_raise(
            f"{type(self).__name__}: no rule for the module(s) {', '.join(labels)}; lrpkit cannot "
            "replace the backward of a custom torch.autograd.Function, so their relevance is that "
            "backward (for an activation its derivative, which does not conserve relevance). Map "
            "them to a rule (an element-wise activation: rules.Pass())"
        )

    def _warn_or_raise(self, message: str) -> None:
        """An :class:`UncoveredModuleWarning` with ``message``, or a ``ValueError`` when ``strict``."""
        if self.strict:
            raise ValueError(message + ", or pass strict=False to only warn.")
        warnings.warn(message + ", or pass strict=True to make this an error.", UncoveredModuleWarning, stacklevel=_user_stacklevel())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: Where lrpkit, torch and the standard library (``contextlib``) keep their code.
_LIBRARY_DIRS = tuple(
    os.path.dirname(package_file) + os.sep
    for package_file in (os.path.dirname(__file__), torch.__file__, contextlib.__file__)
)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning issued by the caller at the first frame outside the libraries."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _resolve(choice: Choice, module: nn.Module) -> Rule | None:
    return choice(module) if isinstance(choice, FirstLayerChoice) else choice


def _constant(rule: Rule) -> RuleChoice:
    return lambda module: rule


def _release(modules: list[nn.Module], session: Session) -> None:
    session.active = False
    for module in modules:
        _MODULES_IN_CONTEXT.discard(module)


def _needs_rule(module: nn.Module) -> bool:
    """Whether relevance passes through ``module``'s parameters to its inputs, so it wants a rule.

    An ``nn.Embedding`` or ``nn.EmbeddingBag`` looks its table up with integer ids: no relevance
    passes through it to them, and what reaches its output is the tokens' relevance
    (:mod:`lrpkit.tokens`).
    """
    return any(True for _ in module.parameters(recurse=False)) and not isinstance(module, (nn.Embedding, nn.EmbeddingBag))

#: Marks a flag a module's ``__dict__`` does not hold.
_ABSENT = object()


def _disable_inplace(model: nn.Module, choices: dict[int, RuleChoice], stack: ExitStack) -> None:
    """Turn ``inplace`` off on modules such as ``ReLU(inplace=True)`` until the context closes.

    An in-place activation would overwrite the output a rule keeps for its backward. A plain
    ``nn.ReLU(inplace=True)`` with a rule instead gets :class:`_RectifyInPlace` as its
    ``forward``, which stays in place where that is safe.
    """
    for module in model.modules():
        # looked up without nn.Module.__getattr__, whose AttributeError costs more than the rest
        inplace = vars(module).get("inplace", _ABSENT)
        if inplace is _ABSENT:
            inplace = getattr(module, "inplace", False) if hasattr(type(module), "inplace") else False
        if inplace is not True:
            continue
        module.inplace = False  # type: ignore[assignment]
        stack.callback(setattr, module, "inplace", True)
        choose = choices.get(id(module))
        if type(module) is nn.ReLU and choose is not None and "forward" not in vars(module):
            module.forward = _RectifyInPlace(module, choose)  # type: ignore[method-assign]
            stack.callback(delattr, module, "forward")


class _RectifyInPlace:
    """``forward`` of an ``nn.ReLU(inplace=True)`` inside a context.

    When the module's rule passes relevance and its input is the untouched output of a rule node,
    the input is rectified in place without autograd recording it
    (:func:`lrpkit.rectified.rectify_in_place`): the relevance reaches that node unchanged, as
    the pass rule gives it, without a node or a new tensor for the ReLU. Otherwise the ReLU runs
    out of place.
    """

    def __init__(self, module: nn.Module, choose: RuleChoice) -> None:
        self.module = module  # (a cycle through the module's __dict__ until the context closes)
        self.choose = choose

    def __call__(self, input: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not hooks_are_suspended() and isinstance(input, Tensor):
            rule = self.choose(self.module)
            if rule is not None and rule.passes_relevance and rectify_in_place(input):
                return input
        return torch.nn.functional.relu(input)


def _first_match(layer_map: LayerMap, module: nn.Module) -> Rule | None:
    return next((rule for types, rule in layer_map if isinstance(module, types)), None)


class LayerMapComposite(Composite):
    """Choose a rule by module type: the first ``(types, rule)`` of ``layer_map`` that matches.

    Parameters
    ----------
    layer_map
        ``[(type or tuple of types, rule), ...]``; groups from :mod:`lrpkit.types` work as types.
    canonizers, strict
        See :class:`Composite`.
    """

    def __init__(
        self,
        layer_map: LayerMap,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(canonizers=canonizers, strict=strict)
        self.layer_map = list(layer_map)

    def module_map(self, ctx: Ctx, name: str, module: nn.Module) -> Choice:
        return _first_match(self.layer_map, module)


class SpecialFirstLayerMapComposite(LayerMapComposite):
    """Like :class:`LayerMapComposite`, but the first layer matching ``first_map`` gets its rule.

    "First" means first in execution order (decided at the first forward call), not in
    registration order.

    Parameters
    ----------
    layer_map
        Rules for every other module, as in :class:`LayerMapComposite`.
    first_map
        ``[(types, rule), ...]`` for the first layer.
    canonizers, strict
        See :class:`Composite`.
    """

    def __init__(
        self,
        layer_map: LayerMap,
        first_map: LayerMap,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(layer_map, canonizers=canonizers, strict=strict)
        self.first_map = list(first_map)

    def module_map(self, ctx: Ctx, name: str, module: nn.Module) -> Choice:
        other = _first_match(self.layer_map, module)
        first = _first_match(self.first_map, module)
        if first is None:
            return other
        return FirstLayerChoice(ctx, first, other)


def _name_matches(pattern: NamePattern, name: str, module: nn.Module) -> bool:
    if callable(pattern):
        return bool(pattern(name, module))
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern


class NameMapComposite(Composite):
    """Choose a rule by module name: exact names, glob patterns or callables.

    Parameters
    ----------
    name_map
        ``[(names, rule), ...]`` where ``names`` is one pattern or a list of them; a pattern is an
        exact name (``"features.0"``), a glob (``"features.*"``) or a callable
        ``(name, module) -> bool``. The first entry that matches wins.
    canonizers, strict
        See :class:`Composite`.
    """

    def __init__(
        self,
        name_map: NameMap,
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(canonizers=canonizers, strict=strict)
        self.name_map = [
            (tuple([names] if isinstance(names, str) or callable(names) else names), rule)
            for names, rule in name_map
        ]

    def module_map(self, ctx: Ctx, name: str, module: nn.Module) -> Choice:
        for patterns, rule in self.name_map:
            if any(_name_matches(pattern, name, module) for pattern in patterns):
                return rule
        return None


class MixedComposite(Composite):
    """Ask several composites in order; the first that gives a rule wins.

    Parameters
    ----------
    composites
        The composites to ask, e.g. a :class:`NameMapComposite` for exceptions, then a preset.
        Their own canonizers are not used: the mixed composite's ``canonizers`` are.
    canonizers, strict
        See :class:`Composite`.
    """

    def __init__(
        self,
        composites: Sequence[Composite],
        canonizers: Sequence[Canonizer] | None = None,
        strict: bool = False,
    ) -> None:
        super().__init__(canonizers=canonizers, strict=strict)
        self.composites = list(composites)

    def module_map(self, ctx: Ctx, name: str, module: nn.Module) -> Choice:
        for index, composite in enumerate(self.composites):
            choice = composite.module_map(ctx.setdefault(f"composite_{index}", {}), name, module)
            if choice is not None:
                return choice
        return None


def eager_module(model: nn.Module) -> nn.Module:
    """``model``, or the module that ``torch.compile`` wrapped into it.

    Rules are forward hooks and autograd nodes made while the model runs eagerly; compiled code
    does not call them. The compiled and the original module compute the same function, so an
    attributor explains the original one.
    """
    return model._orig_mod if _is_compiled(model) else model  # type: ignore[return-value]


def _is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile`` returns (checked by name: importing dynamo is slow)."""
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module)


def _compiled_message(model: nn.Module) -> str:
    """Why rules cannot reach the compiled (torch.compile) or TorchScript module in ``model``, and what to do."""
    name, module = next(
        (name, module) for name, module in model.named_modules() if _is_compiled(module) or isinstance(module, torch.jit.ScriptModule)
    )
    if isinstance(module, torch.jit.ScriptModule):
        where = "the model" if name == "" else f"module {name!r}"
        return (
            f"lrpkit: {where} is a TorchScript module (torch.jit.script or torch.jit.trace); its compiled "
            "code calls no Python hooks, so rules cannot reach it: explain the Python nn.Module it was "
            "made from (build it and load the same state_dict)"
        )
    if name == "":
        where, remedy = "the model", "explain the original module, model._orig_mod (attributors unwrap it themselves)"
    else:
        where, remedy = f"module {name!r}", "put the original module (its ._orig_mod) back in its place to explain the model"
    return (
        f"lrpkit: {where} was compiled with torch.compile; rules are hooks that only run eagerly, "
        f"and compiled code does not call them: {remedy}"
    )
