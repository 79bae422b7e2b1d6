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

Several inputs: ``attributor((a, b))`` (a tuple or list) runs ``model(a, b)`` and explains all
of them in one pass; ``relevance`` is then a tuple with one tensor per input, and for a
conservative composite their sums add up to the explained logit. Every input needs the same
batch size. Options that describe an input (IntegratedGradients' ``baseline``, Occlusion's
``window``, ``stride`` and ``fill``) take one value for every input or a tuple with one per input.

Arguments that are not explained (an attention mask, lengths, a flag) go to every model call as
``attributor(x, model_kwargs={"attention_mask": mask})``; the batched attributors index a tensor
among them that has one row per sample along with the samples.

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

import dataclasses
import difflib
import functools
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
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
#: What an attributor explains: a tensor, or a tuple or list of tensors for ``model(*inputs)``.
Inputs = Union[Tensor, Sequence[Tensor]]
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
        value per token (its embedding vector's, summed). For a tuple of inputs a tuple, one
        tensor per input.
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


@dataclass
class ExplainedInputs:
    """What an attributor was given: one tensor, or a tuple of them (a model with several inputs).

    ``parts`` are the tensors as given, ``single`` says that there was one (the results are then
    one tensor, not a tuple), ``tokens`` which parts are token ids (explained as their
    embedding vectors, see :mod:`lrpkit.tokens`).
    """

    parts: tuple[Tensor, ...]
    single: bool
    tokens: tuple[bool, ...]
    #: Keyword arguments for every model call (``model_kwargs=``), not explained.
    kwargs: dict[str, Any] = field(default_factory=dict)

    def kwargs_for(self, rows: Tensor | None) -> dict[str, Any]:
        """The keyword arguments for the samples ``rows``: a tensor with one row per sample is indexed."""
        if rows is None:
            return self.kwargs
        samples = len(self.parts[0])
        return {
            key: value[rows.to(value.device)] if isinstance(value, Tensor) and value.dim() > 0 and len(value) == samples else value
            for key, value in self.kwargs.items()
        }

    @property
    def token_positions(self) -> tuple[int, ...]:
        return tuple(index for index, is_tokens in enumerate(self.tokens) if is_tokens)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    def packed(self, relevances: Sequence[Tensor], per_token: bool = True) -> Tensor | tuple[Tensor, ...]:
        """One relevance per input (summed over each token's vector if ``per_token``), as given: a tensor or a tuple."""
        if per_token:
            relevances = [rel.sum(-1) if is_tokens else rel for rel, is_tokens in zip(relevances, self.tokens)]
        return relevances[0] if self.single else tuple(relevances)


def explained_inputs(
    x: Any, autograd: bool = True, batched: str | None = None, model_kwargs: Mapping[str, Any] | None = None
) -> ExplainedInputs:
    """Check what an attributor was given: a tensor, or a tuple or list of tensors (``model(*x)``).

    ``batched``: the attributor's name, when it handles samples one row at a time (token ids
    need a batch dimension there). ``model_kwargs``: keyword arguments for every model call.
    """
    if model_kwargs is not None and (
        not isinstance(model_kwargs, Mapping) or not all(isinstance(key, str) for key in model_kwargs)
    ):
        raise TypeError(
            f"model_kwargs must be a dict of keyword arguments for the model, e.g. "
            f"{{'attention_mask': mask}}, got {type(model_kwargs).__name__}"
        )
    single = not isinstance(x, (tuple, list))
    parts = (x,) if single else tuple(x)
    if not parts:
        raise ValueError("the input is an empty tuple; give a tensor, or a tuple of tensors for model(*inputs)")
    tokens = tuple(_checked_part(part, index, single, autograd) for index, part in enumerate(parts))
    if not single:
        sizes = [tuple(part.shape[:1]) for part in parts]
        if any(part.dim() == 0 for part in parts) or len(set(sizes)) > 1:
            raise ValueError(
                f"the inputs' first dimensions differ ({', '.join(str(tuple(part.shape)) for part in parts)}); "
                "every input of a model with several needs one row per sample"
            )
    if batched is not None:
        for index in (index for index, is_tokens in enumerate(tokens) if is_tokens and parts[index].dim() < 2):
            raise ValueError(
                f"{batched} explains token ids of shape (batch, tokens, ...), one sample per row; got "
                f"shape {tuple(parts[index].shape)}{'' if single else f' for input {index}'} (flat ids "
                "with offsets, as an nn.EmbeddingBag takes, have no batch dimension). Use Gradient for "
                "them, or pass the ids as (batch, tokens)"
            )
    return ExplainedInputs(parts, single, tokens, dict(model_kwargs or {}))


def _checked_part(part: Any, index: int, single: bool, autograd: bool) -> bool:
    """:func:`check_input` for one of the inputs, naming it when there are several."""
    try:
        return check_input(part, autograd, tokens=True)
    except (TypeError, RuntimeError) as error:
        if single:
            raise
        raise type(error)(f"input {index}: {error}") from None


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
    inputs
        What the attributor was given; token ids among them are looked up through the model's
        embeddings (:class:`~lrpkit.tokens.TokenLookup`) while the session is open.
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None,
        selector: OutputSelector,
        layer: str | None = None,
        record: Record = None,
        inputs: ExplainedInputs | None = None,
    ) -> None:
        _check_layer(layer)
        self.model = model
        self.composite = composite
        self.selector = selector
        self.layer = layer
        self.record = _record_names(record)
        self.inputs = inputs
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
            if self.inputs is not None and self.inputs.token_positions:  # first: a tap or a recorder sees the vectors put in
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

    def explained(self, parts: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
        """The tensors the attributor explains: the inputs (or ``parts`` in their place), token ids as their vectors."""
        assert self.inputs is not None
        parts = self.inputs.parts if parts is None else parts
        if self.lookup is None:
            return parts
        positions = self.inputs.token_positions
        vectors = dict(zip(positions, self.lookup.vectors(self._bound(None), parts, positions)))
        return tuple(vectors.get(index, part) for index, part in enumerate(parts))

    def forward(self, inputs: tuple[Tensor, ...], rows: Tensor | None = None) -> Tensor:
        """Run the model on ``inputs`` (``model(*inputs)``); the selected output, or the layer's output (stopping there).

        For token ids the entry of ``inputs`` holds the embedding vectors of the ids' samples
        ``rows`` (all if ``None``).
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

    def _call(self, inputs: tuple[Tensor, ...], rows: Tensor | None) -> Any:
        if self.lookup is None:
            return self._bound(rows)(*inputs)
        assert self.inputs is not None
        args, vectors = list(inputs), {}
        for position in self.inputs.token_positions:
            ids = self.inputs.parts[position]
            args[position] = ids if rows is None else ids[rows.to(ids.device)]
            vectors[position] = inputs[position]
        return self.lookup.run(self._bound(rows), args, vectors)

    def _bound(self, rows: Tensor | None) -> Callable[..., Any]:
        """The model with the keyword arguments of the samples ``rows`` (all if ``None``) bound."""
        kwargs = self.inputs.kwargs_for(rows) if self.inputs is not None else {}
        return functools.partial(self.model, **kwargs) if kwargs else self.model

    def _forward_to_layer(self, inputs: tuple[Tensor, ...], rows: Tensor | None, tap: _LayerTap) -> Tensor:
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
def _input_gradients(output: Tensor, inputs: tuple[Tensor, ...], start: Tensor) -> tuple[Tensor, ...]:
    """The (LRP-modified) gradient of ``output`` weighted by ``start`` at each of ``inputs``."""
    if not output.requires_grad:
        raise RuntimeError(
            "the selected output does not depend on the input through autograd (was the "
            "model run under torch.no_grad(), or is the output detached?)"
        )
    gradients = torch.autograd.grad(output, inputs, start, allow_unused=True)
    return tuple(
        torch.zeros_like(tensor) if gradient is None else gradient.detach() for tensor, gradient in zip(inputs, gradients)
    )


def _requiring_grad(parts: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(part.detach().requires_grad_(True) for part in parts)


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
    ``attributor(x, target=None, layer=None, record=None, model_kwargs=None)``:

    ``x``
        A tensor, token ids (explained through the model's embedding, one relevance per token),
        or a tuple of them for ``model(*x)`` (``Attribution.relevance`` is then a tuple).
    ``model_kwargs``
        Keyword arguments for the model call that are not explained (an attention mask).
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
    >>> class TwoInputs(torch.nn.Module):
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    ...     def forward(self, x, y):
    ...         return self.a(x) + self.b(y)
    >>> output, (first, second) = Gradient(TwoInputs(), composites.EpsilonPlus())((torch.rand(1, 3), torch.rand(1, 2)))
    >>> first.shape, second.shape
    (torch.Size([1, 3]), torch.Size([1, 2]))
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
        self,
        x: Inputs,
        target: Target = None,
        layer: str | None = None,
        record: Record = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> Attribution:
        """Explain ``x`` for ``target`` (see the module docstring for the target forms)."""
        given = explained_inputs(x, model_kwargs=model_kwargs)
        with _Session(self.model, self.composite, self.output, layer, record, given) as session:
            inputs = _requiring_grad(session.explained())
            output = session.forward(inputs)
            with _naming_layer(layer):
                start = initial_relevance(output, target)
            relevance = given.packed(_input_gradients(output, inputs, start))
            intermediate = session.recorder.collect() if session.recorder is not None else {}
        return Attribution(output=output.detach(), relevance=relevance, intermediate=intermediate, start=start)


class _ScoreGradient:
    """Shared by GradientXInput and Sensitivity: the gradient of the score ``sum(w * output)``."""

    def __init__(self, model: nn.Module, composite: Composite | None = None, output: OutputSelector = None) -> None:
        self.model = eager_module(model)
        self.composite = composite
        self.output = output

    def _score_gradient(
        self, x: Inputs, target: Target, layer: str | None, model_kwargs: Mapping[str, Any] | None
    ) -> tuple[Tensor, Tensor, ExplainedInputs, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(output, weights, given, explained, gradients)`` for ``x``.

        ``explained`` are the inputs, token ids as their embedding vectors, and ``gradients`` the
        gradients at them.
        """
        given = explained_inputs(x, model_kwargs=model_kwargs)
        with _Session(self.model, self.composite, self.output, layer, inputs=given) as session:
            inputs = _requiring_grad(session.explained())
            output = session.forward(inputs)
            score = _score(output, target, layer)
            gradients = _input_gradients(output, inputs, score.weights)
        return output.detach(), score.weights, given, tuple(part.detach() for part in inputs), gradients


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

    def __call__(
        self, x: Inputs, target: Target = None, layer: str | None = None, model_kwargs: Mapping[str, Any] | None = None
    ) -> Attribution:
        """Explain ``x`` for ``target``, at the model's output or at ``layer``'s output."""
        output, weights, given, explained, gradients = self._score_gradient(x, target, layer, model_kwargs)
        relevance = given.packed([part * gradient for part, gradient in zip(explained, gradients)])
        return Attribution(output=output, relevance=relevance, start=weights)


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

    def __call__(
        self, x: Inputs, target: Target = None, layer: str | None = None, model_kwargs: Mapping[str, Any] | None = None
    ) -> Attribution:
        """Explain ``x`` for ``target``, at the model's output or at ``layer``'s output."""
        output, weights, given, _, gradients = self._score_gradient(x, target, layer, model_kwargs)
        squares = [gradient.square() for gradient in gradients]
        if self.sum_channels:
            squares = [self._channels_summed(part, given, index) for index, part in enumerate(squares)]
        return Attribution(output=output, relevance=given.packed(squares), start=weights)

    @staticmethod
    def _channels_summed(squares: Tensor, given: ExplainedInputs, index: int) -> Tensor:
        """``squares`` summed over dim 1 (token ids: over each token's embedding, as without the option)."""
        if given.tokens[index]:
            return squares
        if squares.ndim < 2:
            raise ValueError(
                f"sum_channels=True needs an input with a channel dimension (dim 1); got shape "
                f"{tuple(squares.shape)}{'' if given.single else f' for input {index}'}"
            )
        return squares.sum(dim=1, keepdim=True)


# -- batched attributors -----------------------------------------------------------------------
def _batches(count: int, batch_size: int, label: str, progress: bool | None) -> Iterator[Tensor]:
    """Indices ``0..count-1`` in chunks of ``batch_size``, with a progress bar."""
    chunks = [torch.arange(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    with Progress(label, len(chunks), progress, unit="batches") as bar:
        for chunk in chunks:
            yield chunk
            bar.step()


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

    @contextmanager
    def _explaining(
        self, x: Inputs, layer: str | None, model_kwargs: Mapping[str, Any] | None
    ) -> Iterator[tuple[ExplainedInputs, _Session, tuple[Tensor, ...]]]:
        """The checked inputs, the open session, and the tensors explained (token ids as vectors)."""
        given = explained_inputs(x, batched=type(self).__name__, model_kwargs=model_kwargs)
        with _Session(self.model, self.composite, self.output, layer, inputs=given) as session:
            yield given, session, tuple(part.detach() for part in session.explained())

    def _clean(self, session: _Session, parts: tuple[Tensor, ...]) -> Tensor:
        """The explained output for the inputs as given (batched, without gradients)."""
        with torch.no_grad():
            outputs = [
                session.forward(tuple(part[rows] for part in parts), rows)
                for rows in _batches(len(parts[0]), self.batch_size, "", False)
            ]
        return torch.cat(outputs).detach()


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

    def __call__(
        self, x: Inputs, target: Target = None, layer: str | None = None, model_kwargs: Mapping[str, Any] | None = None
    ) -> Attribution:
        """Explain ``x`` for ``target``, at the model's output or at ``layer``'s output."""
        with self._explaining(x, layer, model_kwargs) as (given, session, parts):
            clean = self._clean(session, parts)
            score = _score(clean, target, layer)
            patterns = self._patterns(parts)
            spreads = [self.noise * _value_range(part) for part in parts]
            totals = [torch.zeros_like(part) for part in parts]
            starts = torch.zeros_like(clean)
            for copies in self._batches(len(parts[0]) * self.samples):
                rows, pattern = copies // self.samples, copies % self.samples
                rows, pattern = rows.to(given.device), pattern.to(given.device)
                inputs = _requiring_grad(
                    tuple(
                        part[rows] + _expand_rows(spread[rows], part.ndim) * noise[pattern]
                        for part, spread, noise in zip(parts, spreads, patterns)
                    )
                )
                output = session.forward(inputs, rows)
                start = score.start(output, rows)
                for total, gradient in zip(totals, _input_gradients(output, inputs, start)):
                    total.index_add_(0, rows, gradient)
                starts.index_add_(0, rows, start)
        relevance = given.packed([total / self.samples for total in totals])
        return Attribution(output=clean, relevance=relevance, start=starts / self.samples)

    def _patterns(self, parts: tuple[Tensor, ...]) -> list[Tensor]:
        """``samples`` standard-normal patterns shaped like one sample of each input, drawn in turn."""
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator().manual_seed(seed)
        patterns = []
        for part in parts:
            dtype = torch.float64 if part.dtype == torch.float64 else torch.float32
            patterns.append(torch.randn((self.samples, *part.shape[1:]), generator=generator, dtype=dtype).to(part))
        return patterns


def _value_range(part: Tensor) -> Tensor:
    """``max - min`` of each sample (row) of ``part``."""
    flat = part.reshape(len(part), -1)
    return flat.amax(1) - flat.amin(1)


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
        are the baseline. For several inputs: one for all (``None`` or a float), or a tuple with
        one per input.
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
        baseline: Baseline | Sequence[Baseline] = None,
        steps: int = 32,
        method: PathMethod = "trapezoid",
        batch_size: int = 32,
        progress: bool | None = None,
    ) -> None:
        super().__init__(model, composite, output, batch_size, progress)
        for each in baseline if isinstance(baseline, (tuple, list)) else (baseline,):
            if each is not None and not isinstance(each, (int, float, Tensor)):
                raise TypeError(
                    f"baseline must be None (zeros), a float, a tensor, or a tuple of them (one per input), "
                    f"got {type(each).__name__}"
                )
        self.baseline = baseline
        self.steps = _positive_int(steps, "steps")
        self.alphas, self.weights = _path(self.steps, method)
        self.method = method

    def __call__(
        self, x: Inputs, target: Target = None, layer: str | None = None, model_kwargs: Mapping[str, Any] | None = None
    ) -> Attribution:
        """Explain ``x`` for ``target``, at the model's output or at ``layer``'s output."""
        with self._explaining(x, layer, model_kwargs) as (given, session, parts):
            baselines = self._baselines(given, parts, session)
            differences = [part - baseline for part, baseline in zip(parts, baselines)]
            alphas = [torch.tensor(self.alphas, dtype=part.dtype, device=part.device) for part in parts]
            weights = [torch.tensor(self.weights, dtype=part.dtype, device=part.device) for part in parts]
            clean = self._clean(session, parts)
            score = _score(clean, target, layer)
            totals = [torch.zeros_like(part) for part in parts]
            for points in self._batches(len(parts[0]) * self.steps):
                rows, step = (points // self.steps).to(given.device), (points % self.steps).to(given.device)
                inputs = _requiring_grad(
                    tuple(
                        baseline[rows] + _expand_rows(alpha[step], baseline.ndim) * difference[rows]
                        for baseline, alpha, difference in zip(baselines, alphas, differences)
                    )
                )
                output = session.forward(inputs, rows)
                gradients = _input_gradients(output, inputs, score.weights[rows])
                for total, gradient, weight in zip(totals, gradients, weights):
                    total.index_add_(0, rows, gradient * _expand_rows(weight[step], gradient.ndim))
        relevance = given.packed([difference * total for difference, total in zip(differences, totals)])
        return Attribution(output=clean, relevance=relevance, start=score.weights)

    def _baselines(self, given: ExplainedInputs, parts: tuple[Tensor, ...], session: _Session) -> list[Tensor]:
        """One baseline shaped like each explained input; baseline ids of token inputs are embedded."""
        specs = _per_input(self.baseline, len(parts), "baseline")
        id_baselines = {
            index: _broadcast_ids(spec, given.parts[index], index, given.single)
            for index, spec in enumerate(specs)
            if given.tokens[index] and is_token_ids(spec)
        }
        embedded = session.explained(tuple(id_baselines.get(index, part) for index, part in enumerate(given.parts)))
        return [
            embedded[index].detach() if index in id_baselines else _baseline_like(spec, part, index, given.single)
            for index, (spec, part) in enumerate(zip(specs, parts))
        ]


Baseline = Union[None, float, Tensor]


def _per_input(spec: Any, count: int, name: str) -> list[Any]:
    """``spec`` for each of ``count`` inputs: a tuple or list gives one per input, anything else is shared."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != count:
            raise ValueError(f"{name} has {len(spec)} entries for a model with {count} input(s); give one per input")
        return list(spec)
    if count > 1 and isinstance(spec, Tensor):
        raise ValueError(
            f"{name} is one tensor for a model with {count} inputs; give a tuple with one per input "
            "(or a float, used for every input)"
        )
    return [spec] * count


def _baseline_like(spec: Baseline, part: Tensor, index: int, single: bool) -> Tensor:
    """The baseline ``spec`` (``None``: zeros) broadcast to the explained input ``part``."""
    if spec is None:
        return torch.zeros_like(part)
    baseline = torch.as_tensor(spec, dtype=part.dtype, device=part.device)
    try:
        return torch.broadcast_to(baseline, part.shape).detach()
    except RuntimeError:
        raise ValueError(
            f"baseline{'' if single else f' {index}'} has shape {tuple(baseline.shape)}, which does not "
            f"broadcast to the input's shape {tuple(part.shape)}; give a float, a tensor shaped like one "
            "sample or like the input"
        ) from None


def _broadcast_ids(spec: Tensor, ids: Tensor, index: int, single: bool) -> Tensor:
    """Baseline token ids broadcast to the shape of the input's ids."""
    try:
        return torch.broadcast_to(spec.to(device=ids.device, dtype=ids.dtype), ids.shape).contiguous()
    except RuntimeError:
        raise ValueError(
            f"baseline token ids{'' if single else f' {index}'} of shape {tuple(spec.shape)} do not broadcast "
            f"to the input's ids of shape {tuple(ids.shape)}"
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
        after the channel dimension (on dimension 1 for ``(N, features)`` inputs). For several
        inputs an int (every input) or a list with one window per input, ``[(4, 4), 1]``; each
        occluded copy covers a window of one input.
    stride
        Step of the window (int or one per window dimension); ``None``: the window size. For
        several inputs as ``window``.
    fill
        Value of the occluded features: a float, or a tensor broadcastable to the input (e.g. a
        blurred copy of it). For token ids, the id that replaces the occluded tokens (e.g. the
        tokenizer's pad or mask id). For several inputs one float for all or a tuple, one per input.
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
        window: WindowSpec | Sequence[WindowSpec],
        stride: WindowSpec | Sequence[WindowSpec] | None = None,
        fill: float | Tensor | Sequence[float | Tensor] = 0.0,
        batch_size: int = 32,
        progress: bool | None = None,
    ) -> None:
        super().__init__(model, composite, output, batch_size, progress)
        self.window = _window_spec(window, "window")
        self.stride = None if stride is None else _window_spec(stride, "stride")
        for each in fill if isinstance(fill, (tuple, list)) else (fill,):
            if not isinstance(each, (int, float, Tensor)) or isinstance(each, bool):
                raise TypeError(f"fill must be a float, a tensor, or a tuple of them (one per input), got {type(each).__name__}")
        self.fill = fill

    def __call__(
        self, x: Inputs, target: Target = None, layer: str | None = None, model_kwargs: Mapping[str, Any] | None = None
    ) -> Attribution:
        """Explain ``x`` for ``target``, at the model's output or at ``layer``'s output."""
        given = explained_inputs(x, autograd=False, batched=type(self).__name__, model_kwargs=model_kwargs)
        parts = tuple(part.detach() for part in given.parts)
        windows = self._windows(given)  # (input, index tuple of the window) for every window of every input
        fills = [self._fill(part, fill, index, given.single) for index, (part, fill) in enumerate(zip(parts, _per_input(self.fill, len(parts), "fill")))]
        # token ids are occluded as they are: no lookup of them
        as_given = dataclasses.replace(given, tokens=(False,) * len(parts))
        with _Session(self.model, None, self.output, layer, inputs=as_given) as session, torch.no_grad():
            clean = self._clean(session, parts)
            score = _score(clean, target, layer)
            clean_score = score.value(clean, torch.arange(len(clean), device=given.device))
            drops = [torch.zeros(part.shape, dtype=clean_score.dtype, device=part.device) for part in parts]
            for copies in self._batches(len(parts[0]) * len(windows)):
                rows, where = (copies // len(windows)).tolist(), (copies % len(windows)).tolist()
                occluded = [part[rows].clone() for part in parts]
                for index, (row, position) in enumerate(zip(rows, where)):
                    part, window = windows[position]
                    occluded[part][index][window] = fills[part][row][window]
                rows_tensor = torch.tensor(rows, device=given.device)
                drop = clean_score[rows_tensor] - score.value(session.forward(tuple(occluded), rows_tensor), rows_tensor)
                for index, (row, position) in enumerate(zip(rows, where)):
                    part, window = windows[position]
                    drops[part][row][window] += drop[index]
        coverages = [torch.zeros_like(drop[0]) for drop in drops]
        for part, window in windows:
            coverages[part][window] += 1
        relevance = given.packed([drop / coverage for drop, coverage in zip(drops, coverages)], per_token=False)
        return Attribution(output=clean, relevance=relevance, start=score.weights)

    def _windows(self, given: ExplainedInputs) -> list[tuple[int, tuple[slice, ...]]]:
        """Every window position of every input, as ``(input, index tuple into one sample)``."""
        count = len(given.parts)
        windows = _per_window_input(self.window, count, "window")
        strides = [None] * count if self.stride is None else _per_window_input(self.stride, count, "stride")
        return [
            (index, window)
            for index, (part, size, stride) in enumerate(zip(given.parts, windows, strides))
            for window in _windows(part.shape, size, stride)
        ]

    @staticmethod
    def _fill(x: Tensor, fill: float | Tensor, index: int, single: bool) -> Tensor:
        which = "" if single else f" (input {index})"
        if is_token_ids(x) and not _holds_integers(fill):
            raise ValueError(
                f"fill={fill!r}: the input{which} holds token ids, so fill must be a token id (an int, "
                "e.g. the tokenizer's pad or mask id) or a tensor of them"
            )
        value = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
        try:
            return torch.broadcast_to(value, x.shape)
        except RuntimeError:
            raise ValueError(
                f"fill{which} has shape {tuple(value.shape)}, which does not broadcast to the input's shape "
                f"{tuple(x.shape)}; give a float or a tensor shaped like one sample or like the input"
            ) from None


def _holds_integers(value: float | Tensor) -> bool:
    """Whether ``value`` holds only whole numbers (an int, an integral float, an integer tensor)."""
    if isinstance(value, Tensor):
        return is_token_ids(value) or bool((value == value.round()).all())
    return float(value).is_integer()


def _window_spec(value: Any, name: str) -> Any:
    """Check a window or stride: sizes (:func:`_sizes`), or a tuple/list of sizes, one per input."""
    if isinstance(value, (tuple, list)) and any(isinstance(item, (tuple, list)) for item in value):
        return [_sizes(item, name) for item in value]
    return _sizes(value, name)


def _per_window_input(spec: Any, count: int, name: str) -> list[Any]:
    """The window (or stride) of each of ``count`` inputs: an int is shared; with several inputs a
    tuple or list has one entry per input (one input: a tuple is that input's window)."""
    if isinstance(spec, list):  # checked by _window_spec: one entry per input
        entries = spec
    elif count == 1 or isinstance(spec, int):
        return [spec] * count
    else:
        entries = list(spec)
    if len(entries) != count:
        raise ValueError(
            f"{name}={spec!r}: a model with {count} inputs needs an int (every input) or one {name} per "
            "input, e.g. ((2, 2), 1)"
        )
    return entries


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
    "Inputs",
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
