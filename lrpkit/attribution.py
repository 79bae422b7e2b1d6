"""Attributors: run the model, start relevance at the target, propagate it back to the input.

With a composite (or inside ``composite.context(model)``) the backward pass carries LRP
relevance, so the input's "gradient" is the relevance; without one it is the plain gradient.

Targets (``attributor(x, target=...)``):

- ``None``: the predicted class (argmax over dim 1) of each sample;
- an ``int``: that class for every sample;
- a sequence or 1-D tensor of ints: one class per sample;
- a floating tensor shaped like the output: the starting relevance, used as given;
- a callable ``output -> tensor`` shaped like the output.

For class targets the relevance that starts at the output is the target logit's value, so for
conservative rules ``relevance.sum() ≈ output[target]`` per sample.

Anywhere in the model: ``layer="features.28"`` (a module name, or the name of a call captured by
:class:`~lrpkit.canonizers.FunctionalCapture`) explains that layer's output instead of the
model's; a class target then picks a channel (dim 1) of it. ``Gradient(...)(x, record=True)``
also returns the relevance at the input of every leaf module and captured call.

Text models: an input of integer token ids is explained through the model's ``nn.Embedding``
that looks them up (:mod:`lrpkit.tokens`): the attributors explain the embedding vectors and sum
each token's relevance over them, so ``relevance`` has the ids' shape. SmoothGrad adds its noise
to the vectors, IntegratedGradients integrates from a baseline of vectors (zeros, or the vectors
of baseline ids given as an integer tensor), and Occlusion replaces tokens by the id ``fill``.

Besides :class:`Gradient` (one backward pass: LRP with a composite, the gradient without), the
module has the classic attribution methods, each batched and each usable with a composite:
:class:`SmoothGrad`, :class:`IntegratedGradients`, :class:`GradientXInput`,
:class:`Sensitivity` and :class:`Occlusion`.

Examples
--------
>>> import torch
>>> from lrpkit import composites
>>> from lrpkit.attribution import Gradient
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> attribution = Gradient(model, composite=composites.EpsilonPlus())
>>> output, relevance = attribution(torch.rand(2, 4), target=[0, 2])
>>> relevance.shape
torch.Size([2, 4])
"""

from __future__ import annotations

import difflib
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from . import captured
from .canonizers import CompositeCanonizer, FunctionalCapture
from .canonizers.base import CallbackHandle, Canonizer, Handle
from .composites.maps import Composite, eager_module, in_context
from .ops import hooks_are_suspended, hooks_suspended
from .progress import Progress
from .tokens import TokenLookup, is_token_ids

Target = Union[None, int, Sequence[int], Tensor, Callable[[Tensor], Tensor]]
OutputSelector = Union[None, int, str, Callable[[Any], Tensor]]
#: ``record=``: ``True`` (every leaf module and captured call), or names of modules/captured calls.
Record = Union[None, bool, str, Sequence[str]]
PathMethod = Literal["trapezoid", "left", "right", "middle"]


@dataclass
class Attribution:
    """The result of an attributor: unpacks as ``output, relevance``.

    Attributes
    ----------
    output
        The explained model output (the selected one for tuple/dict outputs), detached; with
        ``layer=...`` the layer's output. For the attributors that run the model on modified
        inputs (SmoothGrad, IntegratedGradients, Occlusion) it is the output for the input as
        given.
    relevance
        Relevance (or gradient) of each input feature, shaped like the input; for token ids one
        value per token (its embedding vector's, summed).
    intermediate
        With ``record=...``: the relevance at the input of each recorded module or captured
        call, by name, in the order of the forward pass (empty otherwise). See :class:`Gradient`.
    start
        The relevance that started the backward pass at the explained output (or layer):
        ``weights * output`` for class targets of :class:`Gradient` (averaged over the noisy
        copies for :class:`SmoothGrad`), the target weights ``w`` for the attributors that explain
        the score ``sum(w * output)`` (IntegratedGradients, GradientXInput, Sensitivity,
        Occlusion).
    """

    output: Tensor
    relevance: Tensor
    intermediate: dict[str, Tensor] = field(default_factory=dict)
    start: Tensor | None = None

    def __iter__(self) -> Iterator[Tensor]:
        yield self.output
        yield self.relevance


# -- outputs and targets -----------------------------------------------------------------------
def select_output(raw: Any, selector: OutputSelector) -> Tensor:
    """Pick the tensor to explain from what the model returned.

    Raises
    ------
    TypeError
        If the model returned a tuple, list or dict and no ``selector`` says which entry to use.
    """
    if selector is None:
        if isinstance(raw, Tensor):
            return raw
        kind = type(raw).__name__
        options = list(raw.keys()) if isinstance(raw, dict) else list(range(len(raw))) if isinstance(raw, (tuple, list)) else []
        raise TypeError(
            f"the model returned a {kind}{f' with entries {options}' if options else ''}, not a tensor; "
            "choose what to explain with Gradient(model, output=...): an index, a key, or a "
            "callable that takes the model's return value and gives a tensor"
        )
    if callable(selector):
        selected = selector(raw)
    else:
        try:
            selected = raw[selector]
        except (KeyError, IndexError, TypeError):
            raise TypeError(
                f"output={selector!r} does not select an entry of the model's {type(raw).__name__} output"
            ) from None
    if not isinstance(selected, Tensor):
        raise TypeError(f"output={selector!r} selected a {type(selected).__name__}, not a tensor")
    return selected


#: Backward nodes of operations that only pick or rearrange values (their gradient routes relevance unchanged).
_PICKING = frozenset(
    f"{name}Backward{suffix}"
    for name in (
        "Select", "Slice", "Index", "View", "UnsafeView", "Squeeze", "Unsqueeze", "Transpose", "T", "Permute",
        "Clone", "ToCopy", "AsStrided", "Unbind", "Split", "SplitWithSizes", "Gather", "Expand", "Alias",
    )
    for suffix in ("0", "1", "2")
)


def _warn_if_selector_computes(raw: Any, selected: Tensor, limit: int = 32) -> None:
    """Warn when ``output=`` computed on the model's output instead of picking from it.

    Its operations run after the model, outside the composite's rules: a sum would hand every
    term the whole relevance, a softmax would mix the classes' relevance by its Jacobian.
    """
    sources = {id(tensor.grad_fn) for tensor in _tensors_in(raw) if tensor.grad_fn is not None}
    node = selected.grad_fn
    for _ in range(limit):
        if node is None or id(node) in sources:
            return
        name = type(node).__name__
        if name not in _PICKING:
            warnings.warn(
                f"lrpkit: the output selector computes on the model's output ({name}), after the "
                "model returned and outside the composite's rules, so the backward pass through it is "
                "the plain gradient, not LRP (a sum hands every term the whole relevance). Select "
                "only (an index, a key, out.logits[:, -1]) and compute inside a module: a wrapper "
                "whose forward returns the tensor to explain",
                stacklevel=4,
            )
            return
        parents = [parent for parent, _ in node.next_functions if parent is not None]
        if len(parents) != 1:
            return
        node = parents[0]


def _tensors_in(value: Any, depth: int = 4) -> Iterator[Tensor]:
    """The tensors in a model's return value (tensors, tuples, lists, dicts, nested ``depth`` deep)."""
    if isinstance(value, Tensor):
        yield value
    elif depth > 0 and isinstance(value, (tuple, list, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _tensors_in(item, depth - 1)


def initial_relevance(output: Tensor, target: Target) -> Tensor:
    """The relevance that starts the backward pass at ``output`` for ``target``.

    Raises
    ------
    ValueError
        If a class target is out of range or the number of targets is not the batch size, or a
        tensor/callable target is not shaped like the output.
    TypeError
        If ``target`` is of an unsupported type.
    """
    values = output.detach()
    if callable(target) and not isinstance(target, Tensor):
        target = target(values)
        if not isinstance(target, Tensor):
            raise TypeError(f"a callable target must return a tensor, got {type(target).__name__}")
        return _as_given(target, values, "the callable target's result")
    if isinstance(target, Tensor) and target.is_floating_point():
        return _as_given(target, values, "a tensor target")
    return _one_hot(values, class_indices(values, target)) * values


def _as_given(relevance: Tensor, output: Tensor, what: str) -> Tensor:
    if relevance.shape != output.shape:
        raise ValueError(
            f"{what} has shape {tuple(relevance.shape)} but the output has shape "
            f"{tuple(output.shape)}; a tensor target is the starting relevance and must be shaped "
            "like the output (use an int or a list of ints to pick classes)"
        )
    return relevance.to(output)


def class_indices(output: Tensor, target: Target) -> Tensor:
    """One class index per sample for a class target (``None``, an int, or one int per sample).

    Validated against the output's shape ``(batch, classes, ...)``; ``None`` is the argmax over
    dimension 1.

    Raises
    ------
    ValueError
        If a class is out of range or the number of targets is not the batch size.
    TypeError
        If ``target`` is not a class target.

    Examples
    --------
    >>> class_indices(torch.tensor([[0.1, 0.9], [0.7, 0.3]]), None).tolist()
    [1, 0]
    """
    if output.ndim < 2:
        raise ValueError(
            f"class targets need an output of shape (batch, classes, ...), got {tuple(output.shape)}; "
            "pass a tensor target shaped like the output instead"
        )
    batch, classes = output.shape[0], output.shape[1]
    if target is None:
        if output.ndim > 2:
            raise ValueError(
                f"target=None (argmax) needs an output of shape (batch, classes), got "
                f"{tuple(output.shape)}; pass an int class, or a tensor or callable target"
            )
        return output.argmax(dim=1)
    if isinstance(target, bool):
        raise TypeError("target must be an int class index, not a bool")
    if isinstance(target, int):
        indices = torch.full((batch,), target, dtype=torch.long, device=output.device)
    elif isinstance(target, Tensor) or (isinstance(target, Sequence) and not isinstance(target, str)):
        indices = torch.as_tensor(target, device=output.device)
        if indices.is_floating_point() or indices.dtype == torch.bool or indices.ndim != 1:
            raise TypeError(
                f"a target list/tensor must hold one integer class per sample (1-D, integer dtype); "
                f"got dtype {indices.dtype} and shape {tuple(indices.shape)}. A floating tensor "
                "target must be shaped like the output"
            )
        if len(indices) != batch:
            raise ValueError(f"got {len(indices)} targets for a batch of {batch} samples; give one per sample")
    else:
        raise TypeError(
            f"unsupported target of type {type(target).__name__}; use None, an int, a list of ints, "
            "a tensor or a callable"
        )
    out_of_range = (indices < 0) | (indices >= classes)
    if bool(out_of_range.any()):
        bad = indices[out_of_range][0].item()
        raise ValueError(
            f"target class {bad} is out of range for an output with {classes} classes "
            f"(shape {tuple(output.shape)}); valid classes are 0..{classes - 1}"
        )
    return indices.long()


def _one_hot(output: Tensor, indices: Tensor) -> Tensor:
    mask = torch.zeros_like(output)
    index = indices.view(-1, *([1] * (output.ndim - 1))).expand(-1, 1, *output.shape[2:])
    return mask.scatter_(1, index, 1.0)


def check_input(x: Any, autograd: bool = True, tokens: bool = False) -> bool:
    """Raise a clear error for inputs that cannot carry relevance; whether ``x`` holds token ids.

    ``autograd``: the attributor runs a backward pass, which ``torch.inference_mode()`` rules out,
    both while it is active and for tensors made inside it. ``tokens``: the caller explains
    integer token ids through the model's embedding (:mod:`lrpkit.tokens`).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"the input must be a torch.Tensor, got {type(x).__name__}")
    is_tokens = tokens and is_token_ids(x)
    if not x.is_floating_point() and not is_tokens:
        hint = (
            "; token ids are explained by the attributors (Gradient, SmoothGrad, ...) through the "
            "model's nn.Embedding"
            if is_token_ids(x)
            else ""
        )
        raise TypeError(
            f"the input must be a floating-point tensor to carry relevance, got dtype {x.dtype}; "
            f"convert it first, e.g. x.float(){hint}"
        )
    if not autograd:
        return is_tokens
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "lrpkit: attributions need autograd, which torch.inference_mode() switches off for the "
            "whole block; call the attributor outside `with torch.inference_mode():` "
            "(torch.no_grad() is fine: attributors switch gradients on themselves)"
        )
    if x.is_inference():
        raise RuntimeError(
            "lrpkit: the input was made under torch.inference_mode(), and autograd cannot track "
            "such a tensor; pass a copy made outside it (x.clone() outside the block)"
        )
    return is_tokens


def _per_feature(relevance: Tensor, tokens: bool) -> Tensor:
    """The relevance of the explained tensor as the input's: summed over the embedding for token ids."""
    return relevance.sum(-1) if tokens else relevance


def _tokens_or_none(x: Tensor, tokens: bool) -> Tensor | None:
    return x if tokens else None


@dataclass
class _Score:
    """What the batched attributors explain: ``sum(weights * output)`` per sample.

    ``weights`` is the one-hot class mask (``scales=True``: :class:`Gradient`'s relevance starts
    at ``weights * output``) or the tensor/callable target as given (``scales=False``).
    """

    weights: Tensor
    scales: bool

    def start(self, output: Tensor, rows: Tensor) -> Tensor:
        """:class:`Gradient`'s starting relevance for the copies of the samples ``rows``."""
        weights = self.weights[rows]
        return weights * output.detach() if self.scales else weights

    def value(self, output: Tensor, rows: Tensor) -> Tensor:
        """The score of each copy: ``sum(weights * output)`` over all but the batch dimension."""
        return (self.weights[rows] * output).flatten(1).sum(1)


def _score(explained: Tensor, target: Target, layer: str | None) -> _Score:
    """Resolve ``target`` once, on the output for the input as given."""
    values = explained.detach()
    with _naming_layer(layer):
        if (callable(target) and not isinstance(target, Tensor)) or (
            isinstance(target, Tensor) and target.is_floating_point()
        ):
            return _Score(initial_relevance(values, target), scales=False)
        return _Score(_one_hot(values, class_indices(values, target)), scales=True)


@contextmanager
def _naming_layer(layer: str | None) -> Iterator[None]:
    """Prefix target errors with the layer they are about."""
    try:
        yield
    except (ValueError, TypeError) as error:
        if layer is None or type(error) not in (ValueError, TypeError):
            raise
        raise type(error)(f"layer={layer!r}: {error}") from error


# -- sessions: composite, layer tap, recorder --------------------------------------------------
class _StopForward(Exception):
    """Raised by a layer tap once it has the layer's output: the rest of the forward is skipped."""


class _GradientNames(Composite):
    """No rules, only :class:`FunctionalCapture` naming the calls: the plain gradient with names."""

    warn_uncovered = False

    def __init__(self) -> None:
        super().__init__(canonizers=[FunctionalCapture(rules=[(captured.CapturedOp, None)])])

    def module_map(self, ctx: dict[str, Any], name: str, module: nn.Module) -> None:
        return None


def _captures(canonizers: Sequence[Canonizer]) -> list[FunctionalCapture]:
    """The :class:`FunctionalCapture` canonizers among ``canonizers`` (nested ones included)."""
    found: list[FunctionalCapture] = []
    for canonizer in canonizers:
        if isinstance(canonizer, FunctionalCapture):
            found.append(canonizer)
        elif isinstance(canonizer, CompositeCanonizer):
            found.extend(_captures(canonizer.canonizers))
    return found


def _close_names(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, [item for item in known if item], n=6, cutoff=0.5)
    if not close:
        close = [item for item in known if item][:6]
    return ", ".join(repr(item) for item in close) if close else "(none)"


class _LayerTap:
    """Keeps the output of the first call of one module or captured call and stops the forward."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.output: Tensor | None = None
        self.seen_calls: list[str] = []

    def module_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not hooks_are_suspended() and self.output is None:
            self._keep(output, f"module {self.name!r} ({type(module).__name__})")

    def observe(self, name: str, op: captured.CapturedOp, rule: Any, output: Any) -> None:
        if hooks_are_suspended():
            return
        self.seen_calls.append(name)
        if name == self.name and self.output is None:
            self._keep(output, f"captured call {name!r} ({op.op})")

    def _keep(self, output: Any, what: str) -> None:
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            output = output[0]
        if not isinstance(output, Tensor):
            raise TypeError(
                f"layer={self.name!r}: the {what} returned {type(output).__name__}; a layer target "
                "needs a tensor output (or a tuple whose first entry is one). Choose another layer"
            )
        self.output = output
        raise _StopForward


class _Session:
    """One attributor call: the composite's context, a layer tap and a recorder, all undone on exit.

    Parameters
    ----------
    model, composite, selector
        As given to the attributor. Without a composite, a rule-free one that only names
        functional calls is entered when ``layer``/``record`` need captured-call names (unless the
        caller already holds a composite's context on the model).
    layer
        The module or captured call whose output is explained, or ``None``.
    record
        What to record (see :class:`Gradient`), or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None,
        selector: OutputSelector,
        layer: str | None = None,
        record: Record = None,
        tokens: Tensor | None = None,
    ) -> None:
        _check_layer(layer)
        self.model = model
        self.composite = composite
        self.selector = selector
        self.layer = layer
        self.record = _record_names(record)
        self.tokens = tokens
        self.lookup: TokenLookup | None = None
        #: Whether the selector's work is still to be checked (LRP only: a plain gradient has no rules to miss).
        self._check_selector = callable(selector) and (composite is not None or in_context(model))
        self.tap: _LayerTap | None = None
        self.recorder: _Recorder | None = None
        self._stack = ExitStack()

    def __enter__(self) -> _Session:
        stack = self._stack
        try:
            composite = self._composite()
            if composite is not None:
                stack.enter_context(composite.context(self.model))
            captures = _captures(composite.canonizers) if composite is not None else []
            stack.enter_context(torch.enable_grad())
            if self.tokens is not None:  # first, so that a tap or a recorder sees the vectors put in
                self.lookup = TokenLookup(self.model)
                stack.callback(self.lookup.remove)
            if self.layer is not None:
                self.tap = _install_tap(self.model, self.layer, captures, stack)
            if self.record is not None:
                self.recorder = _Recorder(self.model, self.record, captures, stack)
        except BaseException:
            stack.close()
            raise
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> bool:
        return bool(self._stack.__exit__(kind, error, traceback))

    def _composite(self) -> Composite | None:
        if self.composite is not None:
            return self.composite
        modules = dict(self.model.named_modules())
        needs_names = self.record is not None or (self.layer is not None and self.layer not in modules)
        if needs_names and not in_context(self.model):
            return _GradientNames()
        return None

    def explained(self, x: Tensor) -> Tensor:
        """The tensor the attributor explains: ``x``, or for token ids their embedding vectors."""
        if self.lookup is None:
            return x
        return self.lookup.vectors(self.model, x)

    def forward(self, inputs: Tensor, rows: Tensor | None = None) -> Tensor:
        """Run the model on ``inputs``; the selected output, or the layer's output (stopping there).

        For token ids ``inputs`` are embedding vectors of the ids' samples ``rows`` (all if ``None``).
        """
        if self.tap is None:
            raw = self._call(inputs, rows)
            output = select_output(raw, self.selector)
            if self._check_selector and output.grad_fn is not None:  # (not the clean, gradient-free pass)
                self._check_selector = False
                _warn_if_selector_computes(raw, output)
        else:
            output = self._forward_to_layer(inputs, rows, self.tap)
        if self.recorder is not None:
            self.recorder.check_names()
        return output

    def _call(self, inputs: Tensor, rows: Tensor | None) -> Any:
        if self.lookup is None:
            return self.model(inputs)
        assert self.tokens is not None
        ids = self.tokens if rows is None else self.tokens[rows.to(self.tokens.device)]
        return self.lookup.run(self.model, ids, inputs)

    def _forward_to_layer(self, inputs: Tensor, rows: Tensor | None, tap: _LayerTap) -> Tensor:
        tap.output = None
        tap.seen_calls.clear()
        try:
            self._call(inputs, rows)
        except _StopForward:
            pass
        if tap.output is None:
            raise ValueError(self._layer_not_reached(tap))
        output, tap.output = tap.output, None
        return output

    def _layer_not_reached(self, tap: _LayerTap) -> str:
        modules = dict(self.model.named_modules())
        if tap.name in modules:
            return (
                f"layer={tap.name!r}: module {tap.name!r} ({type(modules[tap.name]).__name__}) was not "
                "called during the forward pass; choose a module the forward pass runs"
            )
        return (
            f"layer={tap.name!r} is neither a module of the model nor a call captured during the "
            f"forward pass; close names: {_close_names(tap.name, [*modules, *tap.seen_calls])}"
        )


def _check_layer(layer: Any) -> None:
    if layer is not None and not isinstance(layer, str):
        raise TypeError(
            f"layer must be a module name such as 'features.28' (or a captured call's name), got "
            f"{type(layer).__name__}"
        )


def _record_names(record: Record) -> bool | list[str] | None:
    if record is None or record is False:
        return None
    if record is True:
        return True
    if isinstance(record, str):
        return [record]
    if isinstance(record, Sequence) and all(isinstance(name, str) for name in record):
        return list(record)
    raise TypeError(
        "record must be True (every leaf module and captured call) or a list of module / "
        f"captured-call names, got {record!r}"
    )


class _NamedModuleHooks:
    """Hooks on the modules of ``model`` chosen by name, looked up again at every forward call.

    Canonizers may swap modules during the first forward call of a context (``MergeBatchNorm``
    replaces a merged BatchNorm by an identity in its root pre-hook, which runs first), so a hook
    goes to the module that holds the name when the forward pass starts.

    Parameters
    ----------
    model
        The model.
    choose
        ``modules by name -> names to hook``.
    attach
        ``(name, module) -> handle``: registers the hook.
    stack
        Receives the undo of everything registered.
    """

    def __init__(
        self,
        model: nn.Module,
        choose: Callable[[dict[str, nn.Module]], list[str]],
        attach: Callable[[str, nn.Module], Handle],
        stack: ExitStack,
    ) -> None:
        self.choose = choose
        self.attach = attach
        self.installed: dict[str, tuple[nn.Module, Handle]] = {}
        stack.callback(self._remove)
        stack.callback(model.register_forward_pre_hook(self._refresh).remove)
        self._refresh(model, ())

    def _refresh(self, model: nn.Module, args: Any) -> None:
        if hooks_are_suspended():
            return
        modules = dict(model.named_modules())
        for name in self.choose(modules):
            known = self.installed.get(name)
            if known is not None and known[0] is modules[name]:
                continue
            if known is not None:
                known[1].remove()
            self.installed[name] = (modules[name], self.attach(name, modules[name]))

    def _remove(self) -> None:
        installed, self.installed = self.installed, {}
        for _, handle in installed.values():
            handle.remove()


def _leaf_names(modules: dict[str, nn.Module]) -> list[str]:
    return [name for name, module in modules.items() if not any(True for _ in module.children())]


def _install_tap(model: nn.Module, name: str, captures: list[FunctionalCapture], stack: ExitStack) -> _LayerTap:
    tap = _LayerTap(name)
    modules = dict(model.named_modules())
    if name in modules:
        _NamedModuleHooks(
            model, lambda current: [name], lambda _, module: module.register_forward_hook(tap.module_hook), stack
        )
        return tap
    if not captures:
        raise ValueError(
            f"layer={name!r} is not a module of the model; close names: {_close_names(name, list(modules))}. "
            "Names of functional calls (such as 'layer1.0.add') need a composite with FunctionalCapture "
            "passed to the attributor (composite=...), or no composite at all"
        )
    for capture in captures:
        stack.callback(capture.observe(model, tap.observe).remove)
    return tap


# -- recording relevance at the inputs of modules and captured calls ---------------------------
@dataclass
class _Entry:
    """One recorded input of one module call or captured call."""

    name: str
    version: int | None = None
    view: weakref.ref[Tensor] | None = None
    modified: bool = False
    relevance: Tensor | None = None

    def add(self, relevance: Tensor) -> None:
        relevance = relevance.detach().clone()  # a copy: nothing later in the backward can change it
        self.relevance = relevance if self.relevance is None else self.relevance + relevance


class _Recorder:
    """Relevance at the input of modules (pre-hook views) and captured calls (node hooks).

    Modules: a forward pre-hook hands the module a fresh view (``tensor.view_as(tensor)``, same
    values, no copy) of each tensor input that requires grad, and a tensor hook on that view sees
    the relevance this call of the module sends to its input -- not the sum over every consumer
    of the tensor, which is what a hook on the tensor itself would see.

    Captured calls: the call's output was produced by one autograd node (the rule's, or the op's
    own); a hook on that node sees the relevance of each of the call's inputs. A call that
    returns its input unchanged (``contiguous`` of a contiguous tensor, ``flatten`` of a flat
    one) has no node of its own and gets no entry.
    """

    def __init__(
        self, model: nn.Module, record: bool | list[str], captures: list[FunctionalCapture], stack: ExitStack
    ) -> None:
        modules = dict(model.named_modules())
        self.leaves = set(_leaf_names(modules))
        if record is True:
            self.calls: set[str] | None = None
        else:
            watched = [name for name in record if name in modules]
            self.calls = {name for name in record if name not in modules}
            if self.calls and not captures:
                missing = sorted(self.calls)[0]
                raise ValueError(
                    f"record: {missing!r} is not a module of the model; close names: "
                    f"{_close_names(missing, list(modules))}. Names of functional calls need a composite "
                    "with FunctionalCapture passed to the attributor (composite=...), or no composite at all"
                )
        self.module_names = list(modules)
        self.entries: list[_Entry] = []
        self.counts: dict[str, int] = {}
        self.seen_calls: set[str] = set()
        self.claimed: set[Any] = set()
        self.handles: list[Any] = []
        stack.callback(self._remove_handles)
        choose = self._leaves if record is True else lambda current: watched
        _NamedModuleHooks(model, choose, self._attach, stack)
        for capture in captures:
            stack.callback(capture.observe(model, self._observe).remove)

    def _leaves(self, modules: dict[str, nn.Module]) -> list[str]:
        leaves = _leaf_names(modules)
        self.leaves = set(leaves)
        return leaves

    def _remove_handles(self) -> None:
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()

    def _call_name(self, name: str) -> str:
        count = self.counts.get(name, 0)
        self.counts[name] = count + 1
        return name if count == 0 else f"{name}#{count}"

    # -- modules ---------------------------------------------------------------------------------
    def _attach(self, name: str, module: nn.Module) -> Handle:
        running: list[list[_Entry]] = []  # the entries of each call of the module now running
        before = module.register_forward_pre_hook(self._module_hook(name, running), with_kwargs=True)
        after = module.register_forward_hook(_version_check(running), always_call=True)
        return CallbackHandle(lambda: (before.remove(), after.remove()))

    def _module_hook(self, name: str, running: list[list[_Entry]]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if hooks_are_suspended():
                return None
            entries: list[_Entry] = []
            running.append(entries)
            keys = [index for index, arg in enumerate(args) if _carries_relevance(arg)]
            keys += [key for key, arg in kwargs.items() if _carries_relevance(arg)]
            if not keys or not torch.is_grad_enabled():
                return None
            call = self._call_name(name)
            new_args, new_kwargs = list(args), dict(kwargs)
            with hooks_suspended():  # not part of the model: FunctionalCapture must not see the view
                for key in keys:
                    entry = _Entry(call if len(keys) == 1 else f"{call}[{key}]")
                    entries.append(entry)
                    if isinstance(key, int):
                        new_args[key] = self._watch(args[key], entry)
                    else:
                        new_kwargs[key] = self._watch(kwargs[key], entry)
            return tuple(new_args), new_kwargs

        return hook

    def _watch(self, tensor: Tensor, entry: _Entry) -> Tensor:
        view = tensor.view_as(tensor)
        # a weak reference: a strong one would count as another name for the tensor, and
        # FunctionalCapture then leaves an in-place call on it (`out += x` after an identity) in place
        entry.view, entry.version = weakref.ref(view), view._version
        self.claimed.add(view.grad_fn)
        self.handles.append(view.register_hook(lambda grad: entry.add(grad)))
        self.entries.append(entry)
        return view

    # -- captured calls --------------------------------------------------------------------------
    def _observe(self, name: str, op: captured.CapturedOp, rule: Any, output: Any) -> None:
        if hooks_are_suspended():
            return
        self.seen_calls.add(name)
        tensor = output[0] if isinstance(output, (tuple, list)) and output else output
        node = tensor.grad_fn if isinstance(tensor, Tensor) else None
        if node is None or node in self.claimed or _made_by_other(node, name):
            return  # the call handed on a tensor made elsewhere: nothing of its own to record
        self.claimed.add(node)
        if self.calls is None and _enclosing_path(name) in self.leaves:
            return  # the implementation of a leaf module, recorded as that module
        if self.calls is not None and name not in self.calls:
            return
        inputs = [index for index, (parent, _) in enumerate(node.next_functions) if _is_activation_edge(parent)]
        entries = {
            index: _Entry(name if len(inputs) == 1 else f"{name}[{position}]") for position, index in enumerate(inputs)
        }
        self.entries.extend(entries.values())
        self.handles.append(node.register_hook(lambda grads, _: _add_node_grads(entries, grads)))

    # -- results ---------------------------------------------------------------------------------
    def check_names(self) -> None:
        """After a forward pass: every requested captured-call name must have run."""
        missing = sorted((self.calls or set()) - self.seen_calls)
        if missing:
            raise ValueError(
                f"record: {missing[0]!r} is neither a module of the model nor a call captured during "
                f"the forward pass; close names: {_close_names(missing[0], [*self.module_names, *self.seen_calls])}"
            )

    def collect(self) -> dict[str, Tensor]:
        """Relevance by name, in forward order, for every recorded input that received some."""
        result: dict[str, Tensor] = {}
        for entry in self.entries:
            if entry.relevance is not None:
                result[entry.name] = entry.relevance
            elif entry.modified or _modified_in_place(entry):
                warnings.warn(
                    f"lrpkit: the input of {entry.name!r} was modified in place during the forward pass, "
                    "so the relevance at that input cannot be recorded; use out-of-place operations "
                    "(e.g. ReLU(inplace=False)) to record it",
                    stacklevel=3,
                )
        return result


def _version_check(running: list[list[_Entry]]) -> Callable[..., None]:
    """Forward hook: note which inputs the module's call modified in place (they cannot be recorded)."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if hooks_are_suspended() or not running:
            return
        for entry in running.pop():
            entry.modified = entry.modified or _modified_in_place(entry)

    return hook


def _modified_in_place(entry: _Entry) -> bool:
    view = entry.view() if entry.view is not None else None
    return view is not None and view._version != entry.version


def _carries_relevance(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point() and value.requires_grad


def _enclosing_path(call_name: str) -> str:
    """``'layer1.0.add'`` -> ``'layer1.0'``; ``'relu_2'`` -> ``''`` (the root)."""
    return call_name.rpartition(".")[0]


def _made_by_other(node: Any, name: str) -> bool:
    """Whether ``node`` is the rule node of another module or captured call."""
    pending = getattr(node, "pending", None)
    return pending is not None and getattr(pending, "name", name) != name


_VIEW_NODES = ("View", "Expand", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Permute", "T", "Select", "Slice")


def _is_activation_edge(node: Any) -> bool:
    """Whether an input edge of an autograd node leads to an activation (not a parameter)."""
    for _ in range(8):
        if node is None:
            return False
        if type(node).__name__ == "AccumulateGrad":
            return not isinstance(getattr(node, "variable", None), nn.Parameter)
        kind = type(node).__name__.rstrip("0123456789").removesuffix("Backward")
        parents = [parent for parent, _ in node.next_functions if parent is not None]
        if kind not in _VIEW_NODES or len(parents) != 1:
            return True
        node = parents[0]
    return True


def _add_node_grads(entries: dict[int, _Entry], grads: Sequence[Tensor | None]) -> None:
    for index, entry in entries.items():
        if index < len(grads) and grads[index] is not None:
            entry.add(grads[index])


# -- the backward pass -------------------------------------------------------------------------
def _input_gradient(output: Tensor, inputs: Tensor, start: Tensor) -> Tensor:
    """The (LRP-modified) gradient of ``output`` weighted by ``start`` at ``inputs``."""
    if not output.requires_grad:
        raise RuntimeError(
            "the selected output does not depend on the input through autograd (was the "
            "model run under torch.no_grad(), or is the output detached?)"
        )
    (gradient,) = torch.autograd.grad(output, inputs, start, allow_unused=True)
    return torch.zeros_like(inputs) if gradient is None else gradient.detach()


class Gradient:
    """Gradient attributor: one forward, one (LRP-modified, with a composite) backward.

    Parameters
    ----------
    model
        The model to explain.
    composite
        Rules to use; entered for each call. ``None``: plain gradient, or whatever composite the
        caller has entered around the call.
    output
        For models returning a tuple, list or dict: an index, a key, or a callable selecting the
        tensor to explain.

    Notes
    -----
    ``attributor(x, target=None, layer=None, record=None)``:

    ``layer``
        A module name (``"features.28"``) or the name of a captured functional call
        (``"layer1.0.add"``, see :mod:`lrpkit.captured`): the backward starts at that layer's
        output with ``initial_relevance(layer_output, target)``; a class target picks a channel
        (dim 1; for a convolution's ``(N, C, H, W)`` output the whole channel map), a tensor target
        is shaped like the layer's output. The forward pass stops at the layer's first call, and
        ``Attribution.output`` is the layer's output.
    ``record``
        ``True``: the relevance at the input of every leaf module and captured call that relevance
        reaches; or a list of names (containers allowed). ``Attribution.intermediate[name]`` is
        shaped like that input, in forward order. A module called several times gets ``name``,
        ``name#1``, ``name#2``, ...; a module or call with several inputs gets ``name[0]``,
        ``name[1]``, ... (``name[key]`` for keyword inputs). Each module receives a view of its
        input (same values, no copy) whose gradient hook sees what this call alone sends back, so
        a tensor used by two modules is not summed over both. Captured calls are recorded with the
        composite's :class:`~lrpkit.canonizers.FunctionalCapture`; without a composite, a
        rule-free capture names them.

    Examples
    --------
    >>> import torch
    >>> from lrpkit import composites
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    >>> result = Gradient(model, composites.EpsilonPlus())(torch.rand(1, 3), target=1)
    >>> torch.allclose(result.relevance.sum(), result.output[0, 1], atol=1e-4)
    True
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> result = Gradient(model, composites.EpsilonPlus())(torch.rand(1, 3), layer="1", target=2, record=True)
    >>> result.output.shape, list(result.intermediate)
    (torch.Size([1, 4]), ['0', '1'])
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None = None,
        output: OutputSelector = None,
    ) -> None:
        self.model = eager_module(model)
        self.composite = composite
        self.output = output

    def __call__(
        self, x: Tensor, target: Target = None, layer: str | None = None, record: Record = None
    ) -> Attribution:
        """Explain ``x`` for ``target`` (see the module docstring for the target forms)."""
        tokens = check_input(x, tokens=True)
        with _Session(self.model, self.composite, self.output, layer, record, _tokens_or_none(x, tokens)) as session:
            inputs = session.explained(x).detach().requires_grad_(True)
            output = session.forward(inputs)
            with _naming_layer(layer):
                start = initial_relevance(output, target)
            relevance = _per_feature(_input_gradient(output, inputs, start), tokens)
            intermediate = session.recorder.collect() if session.recorder is not None else {}
        return Attribution(output=output.detach(), relevance=relevance, intermediate=intermediate, start=start)


class _ScoreGradient:
    """Shared by GradientXInput and Sensitivity: the gradient of the score ``sum(w * output)``."""

    def __init__(self, model: nn.Module, composite: Composite | None = None, output: OutputSelector = None) -> None:
        self.model = eager_module(model)
        self.composite = composite
        self.output = output

    def _score_gradient(self, x: Tensor, target: Target, layer: str | None) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
        """``(output, weights, explained, gradient, tokens)`` for ``x``.

        ``explained`` is ``x``, or for token ids (``tokens``) their embedding vectors, and
        ``gradient`` is the gradient at it.
        """
        tokens = check_input(x, tokens=True)
        with _Session(self.model, self.composite, self.output, layer, tokens=_tokens_or_none(x, tokens)) as session:
            inputs = session.explained(x).detach().requires_grad_(True)
            output = session.forward(inputs)
            score = _score(output, target, layer)
            gradient = _input_gradient(output, inputs, score.weights)
        return output.detach(), score.weights, inputs.detach(), gradient, tokens


class GradientXInput(_ScoreGradient):
    """Gradient times input (Shrikumar et al. 2016): ``x * d score / d x``.

    The score is ``sum(w * output)``: the target logit for class targets (``w`` one-hot), the
    tensor or callable target as given otherwise. Unlike :class:`Gradient`, whose backward starts
    at ``w * output`` (LRP's relevance convention), the backward starts at ``w``, so on a ReLU
    network without biases the result sums to the logit and equals LRP-0.

    Parameters
    ----------
    model, composite, output
        As for :class:`Gradient`. With a composite the (LRP-modified) gradient is multiplied by
        the input; LRP relevance already contains the input, so that is rarely what you want.

    References
    ----------
    A. Shrikumar, P. Greenside, A. Shcherbina, A. Kundaje. "Not Just a Black Box: Learning
    Important Features Through Propagating Activation Differences", arXiv:1605.01713, 2016.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(3, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))
    >>> output, relevance = GradientXInput(model)(torch.rand(2, 3), target=0)
    >>> torch.allclose(relevance.sum(1), output[:, 0])
    True
    """

    def __call__(self, x: Tensor, target: Target = None, layer: str | None = None) -> Attribution:
        """Explain ``x`` for ``target``, at the model's output or at ``layer``'s output."""
        output, weights, explained, gradient, tokens = self._score_gradient(x, target, layer)
        return Attribution(output=output, relevance=_per_feature(explained * gradient, tokens), start=weights)


class Sensitivity(_ScoreGradient):
    """Sensitivity analysis (Simonyan et al. 2014): the squared gradient of the score.

    ``(d score / d x) ** 2`` with the score ``sum(w * output)`` as in :class:`GradientXInput`;
    the squares of a sample sum to the squared norm of its gradient (Montavon et al. 2018).
    Simonyan et al. take the absolute value and its maximum over colour channels; square roots
    and other reductions are one line away.

    Parameters
    ----------
    model, composite, output
        As for :class:`Gradient`.
    sum_channels
        Sum the squares over the channel dimension (dim 1), keeping it with size 1.

    References
    ----------
    K. Simonyan, A. Vedaldi, A. Zisserman. "Deep Inside Convolutional Networks: Visualising
    Image Classification Models and Saliency Maps", ICLR workshop, 2014.
    G. Montavon, W. Samek, K.-R. Müller. "Methods for interpreting and understanding deep neural
    networks", Digital Signal Processing 73, 2018.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Conv2d(3, 2, 3)
    >>> output, relevance = Sensitivity(model, sum_channels=True)(torch.rand(1, 3, 5, 5), target=1)
    >>> relevance.shape
    torch.Size([1, 1, 5, 5])
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None = None,
        output: OutputSelector = None,
        *,
        sum_channels: bool = False,
    ) -> None:
        super().__init__(model, composite, output)
        self.sum_channels = sum_channels

    def __call__(self, x: Tensor, target: Target = None, layer: str | None = None) -> Attribution:
        """Explain ``x`` for ``target``, at the model's output or at ``layer``'s output."""
        output, weights, _, gradient, tokens = self._score_gradient(x, target, layer)
        squares = _per_feature(gradient.square(), tokens)
        if self.sum_channels:
            if tokens:
                raise ValueError(
                    "sum_channels=True: token ids have no channel dimension; each token's squares are "
                    "already summed over its embedding"
                )
            if squares.ndim < 2:
                raise ValueError(
                    f"sum_channels=True needs an input with a channel dimension (dim 1); got shape {tuple(x.shape)}"
                )
            squares = squares.sum(dim=1, keepdim=True)
        return Attribution(output=output, relevance=squares, start=weights)


# -- batched attributors -----------------------------------------------------------------------
def _batches(count: int, batch_size: int, label: str, progress: bool | None) -> Iterator[Tensor]:
    """Indices ``0..count-1`` in chunks of ``batch_size``, with a progress bar."""
    chunks = [torch.arange(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    with Progress(label, len(chunks), progress, unit="batches") as bar:
        for chunk in chunks:
            yield chunk
            bar.step()


def _check_batched(x: Any, name: str, autograd: bool = True) -> bool:
    """:func:`check_input` for the batched attributors; token ids must have a batch dimension."""
    tokens = check_input(x, autograd=autograd, tokens=True)
    if tokens and x.dim() < 2:
        raise ValueError(
            f"{name} explains token ids of shape (batch, tokens, ...), one sample per row; got shape "
            f"{tuple(x.shape)} (flat ids with offsets, as an nn.EmbeddingBag takes, have no batch "
            "dimension). Use Gradient for them, or pass the ids as (batch, tokens)"
        )
    return tokens


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _expand_rows(values: Tensor, ndim: int) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` with ``ndim`` dimensions in all."""
    return values.view(-1, *([1] * (ndim - 1)))


class _Batched:
    """Constructor and clean forward pass shared by the attributors that run many model calls."""

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None,
        output: OutputSelector,
        batch_size: int,
        progress: bool | None,
    ) -> None:
        self.model = eager_module(model)
        self.composite = composite
        self.output = output
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.progress = progress

    def _batches(self, count: int) -> Iterator[Tensor]:
        return _batches(count, self.batch_size, type(self).__name__, self.progress)

    def _clean(self, session: _Session, x: Tensor) -> Tensor:
        """The explained output for the input as given (batched, without gradients)."""
        with torch.no_grad():
            parts = [session.forward(x[rows], rows) for rows in _batches(len(x), self.batch_size, "", False)]
        return torch.cat(parts).detach()


class SmoothGrad(_Batched):
    """SmoothGrad (Smilkov et al. 2017): the average explanation of noisy copies of the input.

    Each sample gets ``samples`` copies with Gaussian noise of standard deviation
    ``noise * (max - min)`` of that sample; the result is the average of :class:`Gradient`'s
    result for the copies: the average gradient without a composite, the average LRP relevance
    with one (the composite's context is entered once around all batches). With ``noise=0`` it
    equals :class:`Gradient`.

    Targets as for :class:`Gradient`, resolved once on the clean input: ``None`` is the class the
    model predicts for the clean input, kept for every copy; a callable is called on the clean
    output and its result used as given. Class targets start at ``w * output`` of each copy, as in
    :class:`Gradient`.

    Every sample uses the same ``samples`` standard-normal patterns (scaled by its own range), so
    a sample's result does not depend on the other samples in the batch; ``seed`` makes it
    reproducible (``None``: drawn from torch's global generator).

    Parameters
    ----------
    model, composite, output
        As for :class:`Gradient`.
    noise
        Standard deviation relative to each sample's value range (``>= 0``), as zennit's
        ``noise_level``.
    samples
        Noisy copies per sample.
    batch_size
        Copies per model call.
    seed
        Seed of the noise.
    progress
        Show a progress bar on stderr; ``None``: on a terminal, once the run has taken more than
        a second (see :class:`lrpkit.progress.Progress`).

    References
    ----------
    D. Smilkov, N. Thorat, B. Kim, F. Viégas, M. Wattenberg. "SmoothGrad: removing noise by
    adding noise", arXiv:1706.03825, 2017.

    Examples
    --------
    >>> import torch
    >>> from lrpkit import composites
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> smooth = SmoothGrad(model, composites.EpsilonPlus(), noise=0.1, samples=8, seed=0)
    >>> output, relevance = smooth(torch.rand(2, 4), target=1)
    >>> relevance.shape
    torch.Size([2, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None = None,
        output: OutputSelector = None,
        *,
        noise: float = 0.1,
        samples: int = 16,
        batch_size: int = 32,
        seed: int | None = None,
        progress: bool | None = None,
    ) -> None:
        super().__init__(model, composite, output, batch_size, progress)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise ValueError(
                f"noise must be a float >= 0 (standard deviation relative to the input range), got {noise!r}"
            )
        self.noise = float(noise)
        self.samples = _positive_int(samples, "samples")
        self.seed = seed

    def __call__(self, x: Tensor, target: Target = None, layer: str | None = None) -> Attribution:
        """Explain ``x`` for ``target``, at the model's output or at ``layer``'s output."""
        tokens = _check_batched(x, type(self).__name__)
        with _Session(self.model, self.composite, self.output, layer, tokens=_tokens_or_none(x, tokens)) as session:
            x = session.explained(x)
            clean = self._clean(session, x)
            score = _score(clean, target, layer)
            patterns = self._patterns(x)
            flat = x.detach().reshape(len(x), -1)
            spread = self.noise * (flat.amax(1) - flat.amin(1))
            total = torch.zeros_like(x)
            starts = torch.zeros_like(clean)
            for copies in self._batches(len(x) * self.samples):
                rows, pattern = copies // self.samples, copies % self.samples
                rows = rows.to(x.device)
                inputs = (x[rows] + _expand_rows(spread[rows], x.ndim) * patterns[pattern.to(x.device)]).detach()
                inputs.requires_grad_(True)
                output = session.forward(inputs, rows)
                start = score.start(output, rows)
                total.index_add_(0, rows, _input_gradient(output, inputs, start))
                starts.index_add_(0, rows, start)
        relevance = _per_feature(total / self.samples, tokens)
        return Attribution(output=clean, relevance=relevance, start=starts / self.samples)

    def _patterns(self, x: Tensor) -> Tensor:
        """``samples`` standard-normal patterns shaped like one sample."""
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator().manual_seed(seed)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.randn((self.samples, *x.shape[1:]), generator=generator, dtype=dtype).to(x)


def _path(steps: int, method: PathMethod) -> tuple[list[float], list[float]]:
    """Positions ``alpha`` on the straight path and their quadrature weights (summing to 1)."""
    if method == "trapezoid":
        if steps < 2:
            raise ValueError(f"method='trapezoid' needs steps >= 2 (both ends of the path), got steps={steps}")
        alphas = [k / (steps - 1) for k in range(steps)]
        weights = [1.0 / (steps - 1)] * steps
        weights[0] = weights[-1] = 0.5 / (steps - 1)
        return alphas, weights
    offsets = {"left": 0.0, "middle": 0.5, "right": 1.0}
    if method not in offsets:
        raise ValueError(f"method must be one of 'trapezoid', 'left', 'right', 'middle', got {method!r}")
    return [(k + offsets[method]) / steps for k in range(steps)], [1.0 / steps] * steps


class IntegratedGradients(_Batched):
    """Integrated Gradients (Sundararajan et al. 2017) along the straight path from a baseline.

    ``(x - baseline) * integral_0^1 d score / d x (baseline + alpha (x - baseline)) d alpha``,
    with the score ``sum(w * output)`` as in :class:`GradientXInput` (the target logit for class
    targets; targets resolved on the clean input). The integral is a quadrature over ``steps``
    points; completeness holds up to its error: per sample,
    ``relevance.sum() ≈ score(x) - score(baseline)``.

    Parameters
    ----------
    model, composite, output
        As for :class:`Gradient`. With a composite the LRP-modified gradient is integrated.
    baseline
        ``None`` (zeros), a float, or a tensor broadcastable to the input. For token ids these
        are embedding vectors; an integer tensor is baseline ids (e.g. pad ids), whose vectors
        are the baseline.
    steps
        Gradient evaluations per sample.
    method
        ``"trapezoid"`` (both ends, ``steps >= 2``), or the Riemann sums ``"left"`` (from the
        baseline), ``"right"`` (up to the input) and ``"middle"``. ``steps=1, method="right"`` with
        a zero baseline is :class:`GradientXInput`.
    batch_size
        Path points per model call.
    progress
        As for :class:`SmoothGrad`.

    References
    ----------
    M. Sundararajan, A. Taly, Q. Yan. "Axiomatic Attribution for Deep Networks", ICML 2017.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Softplus(), torch.nn.Linear(8, 3)).double()
    >>> x = torch.rand(2, 4, dtype=torch.float64)
    >>> output, relevance = IntegratedGradients(model, steps=64)(x, target=2)
    >>> at_zero = model(torch.zeros_like(x))[:, 2]
    >>> torch.allclose(relevance.sum(1), output[:, 2] - at_zero, atol=1e-4)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None = None,
        output: OutputSelector = None,
        *,
        baseline: float | Tensor | None = None,
        steps: int = 32,
        method: PathMethod = "trapezoid",
        batch_size: int = 32,
        progress: bool | None = None,
    ) -> None:
        super().__init__(model, composite, output, batch_size, progress)
        if baseline is not None and not isinstance(baseline, (int, float, Tensor)):
            raise TypeError(f"baseline must be None (zeros), a float or a tensor, got {type(baseline).__name__}")
        self.baseline = baseline
        self.steps = _positive_int(steps, "steps")
        self.alphas, self.weights = _path(self.steps, method)
        self.method = method

    def __call__(self, x: Tensor, target: Target = None, layer: str | None = None) -> Attribution:
        """Explain ``x`` for ``target``, at the model's output or at ``layer``'s output."""
        tokens = _check_batched(x, type(self).__name__)
        with _Session(self.model, self.composite, self.output, layer, tokens=_tokens_or_none(x, tokens)) as session:
            ids, x = x, session.explained(x)
            baseline = self._baseline(x, ids, session) if tokens else self._baseline(x)
            difference = x.detach() - baseline
            alphas = torch.tensor(self.alphas, dtype=x.dtype, device=x.device)
            weights = torch.tensor(self.weights, dtype=x.dtype, device=x.device)
            clean = self._clean(session, x)
            score = _score(clean, target, layer)
            total = torch.zeros_like(x)
            for points in self._batches(len(x) * self.steps):
                rows, step = (points // self.steps).to(x.device), (points % self.steps).to(x.device)
                inputs = (baseline[rows] + _expand_rows(alphas[step], x.ndim) * difference[rows]).detach()
                inputs.requires_grad_(True)
                output = session.forward(inputs, rows)
                gradient = _input_gradient(output, inputs, score.weights[rows])
                total.index_add_(0, rows, gradient * _expand_rows(weights[step], x.ndim))
        return Attribution(output=clean, relevance=_per_feature(difference * total, tokens), start=score.weights)

    def _baseline(self, x: Tensor, ids: Tensor | None = None, session: _Session | None = None) -> Tensor:
        """The baseline shaped like ``x``; for token ids (``ids``) a baseline of ids is embedded."""
        if self.baseline is None:
            return torch.zeros_like(x)
        if ids is not None and session is not None and is_token_ids(self.baseline):
            return session.explained(self._baseline_ids(ids))
        baseline = torch.as_tensor(self.baseline, dtype=x.dtype, device=x.device)
        try:
            return torch.broadcast_to(baseline, x.shape).detach()
        except RuntimeError:
            raise ValueError(
                f"baseline has shape {tuple(baseline.shape)}, which does not broadcast to the input's "
                f"shape {tuple(x.shape)}; give a float, a tensor shaped like one sample or like the input"
            ) from None

    def _baseline_ids(self, ids: Tensor) -> Tensor:
        """A baseline of token ids broadcast to the shape of the input's ids."""
        assert isinstance(self.baseline, Tensor)
        try:
            return torch.broadcast_to(self.baseline.to(device=ids.device, dtype=ids.dtype), ids.shape).contiguous()
        except RuntimeError:
            raise ValueError(
                f"baseline token ids of shape {tuple(self.baseline.shape)} do not broadcast to the input's "
                f"ids of shape {tuple(ids.shape)}"
            ) from None


WindowSpec = Union[int, Sequence[int]]


class Occlusion(_Batched):
    """Occlusion (Zeiler & Fergus 2014): how much the score drops when a window is covered.

    A window slides over the last dimensions of each sample (all channels at once); each occluded
    copy has the window set to ``fill``. A feature's relevance is the drop of the score
    ``sum(w * output)`` (as in :class:`GradientXInput`) averaged over the windows that cover it.
    Windows also sit at the far edge, so every feature is covered. Only forward passes are run.

    Parameters
    ----------
    model, composite, output
        As for :class:`Gradient`; the composite is not used (occlusion needs no backward pass)
        and is accepted so that every attributor is built alike.
    window
        Window size over the last ``len(window)`` dimensions; an int: that size on every dimension
        after the channel dimension (on dimension 1 for ``(N, features)`` inputs).
    stride
        Step of the window (int or one per window dimension); ``None``: the window size.
    fill
        Value of the occluded features: a float, or a tensor broadcastable to the input (e.g. a
        blurred copy of it). For token ids, the id that replaces the occluded tokens (e.g. the
        tokenizer's pad or mask id).
    batch_size
        Occluded copies per model call.
    progress
        As for :class:`SmoothGrad`.

    References
    ----------
    M. D. Zeiler, R. Fergus. "Visualizing and Understanding Convolutional Networks", ECCV 2014.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Linear(4, 2, bias=False)
    >>> x = torch.ones(1, 4)
    >>> output, relevance = Occlusion(model, window=1)(x, target=0)
    >>> torch.allclose(relevance, model.weight[0:1] * x)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None = None,
        output: OutputSelector = None,
        *,
        window: WindowSpec,
        stride: WindowSpec | None = None,
        fill: float | Tensor = 0.0,
        batch_size: int = 32,
        progress: bool | None = None,
    ) -> None:
        super().__init__(model, composite, output, batch_size, progress)
        self.window = _sizes(window, "window")
        self.stride = None if stride is None else _sizes(stride, "stride")
        if not isinstance(fill, (int, float, Tensor)) or isinstance(fill, bool):
            raise TypeError(f"fill must be a float or a tensor, got {type(fill).__name__}")
        self.fill = fill

    def __call__(self, x: Tensor, target: Target = None, layer: str | None = None) -> Attribution:
        """Explain ``x`` for ``target``, at the model's output or at ``layer``'s output."""
        _check_batched(x, type(self).__name__, autograd=False)
        x = x.detach()
        windows = _windows(x.shape, self.window, self.stride)
        fill = self._fill(x)
        with _Session(self.model, None, self.output, layer) as session, torch.no_grad():
            clean = self._clean(session, x)
            score = _score(clean, target, layer)
            clean_score = score.value(clean, torch.arange(len(x), device=x.device))
            drops = torch.zeros(x.shape, dtype=clean_score.dtype, device=x.device)
            for copies in self._batches(len(x) * len(windows)):
                rows, where = (copies // len(windows)).tolist(), (copies % len(windows)).tolist()
                occluded = x[rows].clone()
                for index, (row, position) in enumerate(zip(rows, where)):
                    occluded[index][windows[position]] = fill[row][windows[position]]
                rows_tensor = torch.tensor(rows, device=x.device)
                drop = clean_score[rows_tensor] - score.value(session.forward(occluded), rows_tensor)
                for index, (row, position) in enumerate(zip(rows, where)):
                    drops[row][windows[position]] += drop[index]
        coverage = torch.zeros_like(drops[0])
        for window in windows:
            coverage[window] += 1
        return Attribution(output=clean, relevance=drops / coverage, start=score.weights)

    def _fill(self, x: Tensor) -> Tensor:
        if is_token_ids(x) and not _holds_integers(self.fill):
            raise ValueError(
                f"fill={self.fill!r}: the input holds token ids, so fill must be a token id (an int, "
                "e.g. the tokenizer's pad or mask id) or a tensor of them"
            )
        fill = torch.as_tensor(self.fill, dtype=x.dtype, device=x.device)
        try:
            return torch.broadcast_to(fill, x.shape)
        except RuntimeError:
            raise ValueError(
                f"fill has shape {tuple(fill.shape)}, which does not broadcast to the input's shape "
                f"{tuple(x.shape)}; give a float or a tensor shaped like one sample or like the input"
            ) from None


def _holds_integers(value: float | Tensor) -> bool:
    """Whether ``value`` holds only whole numbers (an int, an integral float, an integer tensor)."""
    if isinstance(value, Tensor):
        return is_token_ids(value) or bool((value == value.round()).all())
    return float(value).is_integer()


def _sizes(value: WindowSpec, name: str) -> tuple[int, ...] | int:
    if isinstance(value, int) and not isinstance(value, bool):
        return _positive_int(value, name)
    items = list(value) if isinstance(value, Sequence) else []
    if items and all(isinstance(item, int) and not isinstance(item, bool) for item in items):
        return tuple(_positive_int(item, name) for item in items)
    raise ValueError(f"{name} must be a positive int or a non-empty tuple of positive ints, got {value!r}")


def _windows(
    shape: torch.Size, window: tuple[int, ...] | int, stride: tuple[int, ...] | int | None
) -> list[tuple[slice, ...]]:
    """Index tuples (into one sample) of every window position."""
    features = tuple(shape[1:])
    if isinstance(window, int):
        window = (window,) * (max(len(features) - 1, 1))
    if len(window) > len(features):
        raise ValueError(
            f"window={window} has {len(window)} dimensions but the input of shape {tuple(shape)} has "
            f"{len(features)} per sample; give at most one size per dimension after the batch dimension"
        )
    if stride is None:
        stride = window
    elif isinstance(stride, int):
        stride = (stride,) * len(window)
    if len(stride) != len(window):
        raise ValueError(f"stride={stride} must have one step per window dimension (window={window})")
    sizes = features[len(features) - len(window):]
    starts = [_starts(size, size_w, step, dim) for dim, (size, size_w, step) in enumerate(zip(sizes, window, stride))]
    whole = (slice(None),) * (len(features) - len(window))
    return [
        (*whole, *(slice(begin, begin + size_w) for begin, size_w in zip(corner, window)))
        for corner in itertools.product(*starts)
    ]


def _starts(size: int, window: int, stride: int, dim: int) -> list[int]:
    if window > size:
        raise ValueError(f"window size {window} is larger than the input's size {size} in window dimension {dim}")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


__all__ = [
    "Attribution",
    "Gradient",
    "GradientXInput",
    "IntegratedGradients",
    "Occlusion",
    "Record",
    "Sensitivity",
    "SmoothGrad",
    "Target",
    "class_indices",
    "initial_relevance",
    "select_output",
]
