"""Token-id inputs: explain a text model from its integer input, through its embedding lookup.

Integer token ids carry no gradient, so the attributors explain the output of the model's
``nn.Embedding`` that looks them up: the embedding vectors of the tokens. The relevance of a
token is the sum of its vector's relevance over the embedding dimension (Arras et al. 2017), so
for conservative rules the tokens' relevances still sum to the explained output.

:class:`TokenLookup` finds that lookup by its input: the ``F.embedding`` call (what
``nn.Embedding`` and its subclasses run), or the ``table[ids]`` / ``table.index_select(0, ids)``
of a 2-D parameter or buffer of the model, whose input is the token-id tensor given to the model,
a view of it (``ids.t()``, ``ids.view(-1, T)``, ``ids[:, 1:]``), or a copy made by calls that
only move or convert values (``ids.long()``, ``ids.t().contiguous()``, ``ids.to(device)``; each
element's origin is followed). An embedding module that
takes the ids but looks up something else (BART's learned positions, computed from their
shape) is left alone, and what a subclass does with the vectors (Gemma scales them) stays
part of the model. It keeps the embedding vectors in the layout of the ids,
``(*ids.shape, dim)``, so that the attributors can index, perturb and integrate them per sample
as they do any input, and puts them in place of the lookup's output in each forward pass.

An ``nn.EmbeddingBag`` (mode ``"sum"`` or ``"mean"``; ids of shape ``(bags, tokens)``, or flat
with ``offsets``; ``padding_idx`` and ``per_sample_weights``) looks up and reduces in one call.
Its lookup is replaced the same way, and its reduction is computed again from the vectors as
calls that :class:`~lrpkit.canonizers.FunctionalCapture` (in every preset) explains: each bag's
sum split in proportion to its tokens' vectors, the mean's count and the weights held constant.

Examples
--------
>>> import torch
>>> from torch import nn
>>> from lrpkit import composites
>>> from lrpkit.attribution import Gradient
>>> model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2, bias=False))
>>> ids = torch.tensor([[1, 5, 7]])
>>> output, relevance = Gradient(model, composites.EpsilonPlus())(ids, target=0)
>>> relevance.shape
torch.Size([1, 3])
>>> torch.allclose(relevance.sum(), output[0, 0], atol=1e-5)
True

References
----------
L. Arras, G. Montavon, K.-R. Müller, W. Samek. "Explaining Recurrent Neural Network Predictions
in Sentiment Analysis", EMNLP workshop WASSA, 2017.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from .canonizers.functional import _op_name
from .ops import hooks_are_suspended, hooks_suspended


def is_token_ids(x: Any) -> bool:
    """Whether ``x`` is a tensor of integer token ids (any integer dtype, not bool)."""
    return isinstance(x, Tensor) and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool


class _Found(Exception):
    """Stops the forward pass once every lookup's output is kept (nothing after them is needed)."""


Call = Callable[..., Any]
#: Which of the ids a tensor holds, and the flat index into them of each of its elements.
_Source = tuple[int, Tensor]

#: Calls that only rearrange, copy or convert values: the ids moved by them are still the ids.
_MOVES = frozenset(
    {
        "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
        "transpose", "swapaxes", "permute", "movedim", "t", "T", "mT", "contiguous", "clone", "to",
        "long", "int", "short", "type", "cpu", "cuda", "getitem", "narrow", "select", "expand",
        "expand_as", "repeat", "flip", "roll", "index_select", "gather",
    }
)


class TokenLookup:
    """Finds and replaces the lookups of token ids in ``model``'s forward pass.

    Parameters
    ----------
    model
        The model. Its ``F.embedding`` calls are watched while it runs under :meth:`vectors` or
        :meth:`run` (a torch-function mode); every ``nn.EmbeddingBag`` gets a forward hook until
        :meth:`remove`.

    Notes
    -----
    The model is called as ``call(*args)``; the token ids are the arguments at the given
    positions (several for a model with several token inputs). Only a lookup whose input shares
    its memory with one of them counts; position or segment embeddings looked up with ids the
    model makes itself are left alone. Each id tensor must be looked up exactly once per forward
    pass.
    """

    def __init__(self, model: nn.Module) -> None:
        self._ids: dict[int, Tensor] = {}
        #: Tensors moved out of the ids during the current call, with where their values come from.
        self._moved: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self._count = 1
        self._vectors: dict[int, Tensor] = {}
        self._keep = False
        self._kept: dict[int, Tensor] = {}
        self._seen: dict[int, list[str]] = {}
        embeddings = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Embedding)]
        #: The module that holds each embedding table (or the table's own name, for a table that
        #: is a parameter of another module, read as ``table[ids]``), to name a lookup by.
        self._tables = {**_raw_tables(model), **{id(module.weight): name for name, module in embeddings}}
        self._handles = [
            module.register_forward_hook(self._bag_hook(name), with_kwargs=True)
            for name, module in model.named_modules()
            if isinstance(module, nn.EmbeddingBag)
        ]
        if not self._tables and not self._handles:
            raise TypeError(
                f"lrpkit: the input holds integers, and the model ({type(model).__name__}) has no "
                "nn.Embedding to look them up as token ids; pass a floating-point tensor instead, e.g. "
                "x.float() (an 8-bit image: x.float() / 255)"
            )

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def vectors(self, call: Call, args: Sequence[Any], positions: Sequence[int]) -> tuple[Tensor, ...]:
        """The embedding vectors of the ids ``args[p]`` for ``p`` in ``positions``, ``(*ids.shape, dim)`` each.

        Runs ``call(*args)`` up to the last of their lookups. A token a lookup skips
        (``ids[:, 1:]``) gets a zero vector.
        """
        args = _contiguous(args, positions)
        with self._looking_up(args, positions), torch.no_grad(), _LookupMode(self):
            self._keep = True
            try:
                call(*args)
            except _Found:
                pass
            finally:
                self._keep = False
            kept, self._kept = self._kept, {}
            self._check_seen(kept)
        return tuple(kept[position] for position in positions)

    def run(self, call: Call, args: Sequence[Any], vectors: dict[int, Tensor]) -> Any:
        """``call(*args)`` with ``vectors[p]`` (``(*args[p].shape, dim)``) in place of the lookup of ``args[p]``."""
        args = _contiguous(args, list(vectors))
        with self._looking_up(args, list(vectors)), _LookupMode(self):
            self._vectors = vectors
            try:
                result = call(*args)
            finally:
                self._vectors = {}
            self._check_seen(self._seen)
        return result

    @contextmanager
    def _looking_up(self, args: Sequence[Any], positions: Sequence[int]) -> Iterator[None]:
        self._ids, self._count, self._seen = {position: args[position] for position in positions}, len(args), {}
        self._moved = WeakTensorKeyDictionary()
        try:
            yield
        finally:
            self._ids, self._moved = {}, WeakTensorKeyDictionary()

    def _check_seen(self, found: dict[int, Any]) -> None:
        missing = [position for position in self._ids if position not in found]
        if missing:
            raise ValueError(_not_looked_up(_which(missing[0], self._count)))

    def _source(self, tensor: Any) -> _Source | None:
        """Which of the ids ``tensor`` holds, and where each of its elements comes from; ``None`` if none.

        The ids themselves, a view of them, or a tensor moved out of them by calls that only
        rearrange, copy or convert (:meth:`follow`: ``ids.t().contiguous()``, ``ids.long()``).
        """
        if not isinstance(tensor, Tensor) or not self._ids:
            return None
        moved = self._moved.get(tensor)
        if moved is not None:
            return moved
        for position, ids in self._ids.items():
            if _is_view_of(tensor, ids):
                return position, _positions(tensor, ids)
        return None

    def follow(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
        """Remember ``result`` if a call that only moves values (:data:`_MOVES`) made it from the ids."""
        if not isinstance(result, Tensor) or result.is_floating_point() or result.dtype == torch.bool:
            return
        source = self._source(args[0]) if args else None
        if source is None or _op_name(func) not in _MOVES:
            return
        position, index = source
        with torch._C.DisableTorchFunction():  # the same call on the positions moves them alike
            moved = func(index, *args[1:], **kwargs)
        if isinstance(moved, Tensor) and moved.shape == result.shape:
            self._moved[result] = (position, moved.to(result.device))

    def embedding(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """An ``F.embedding`` call: the vectors in place of its output if it looks up the ids."""
        lookup = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        source = self._source(lookup)
        output = F.embedding(*args, **kwargs)
        if source is None:
            return output
        name = self._tables.get(id(weight), "F.embedding")
        with hooks_suspended(), torch._C.DisableTorchFunction():
            return self._lookup(name, "Embedding", source, output)

    def rows(self, table: Tensor, index: Any, output: Any) -> Any:
        """``table[ids]`` or ``table.index_select(0, ids)``: the vectors in place of ``output`` if
        ``index`` holds the ids and ``table`` is an embedding table (2-D, floating point)."""
        name = self._tables.get(id(table))  # (a parameter or buffer of the model, not an activation)
        source = None if name is None else self._source(index)
        if source is None:
            return output
        with hooks_suspended(), torch._C.DisableTorchFunction():
            return self._lookup(name, "table", source, output)

    def _bag_hook(self, name: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            bag = _bag_arguments(args, kwargs)
            source = self._source(bag.lookup)
            if source is None:
                return None
            return self._bag(name, module, bag, source, output)

        return hook

    def _bag(self, name: str, module: nn.EmbeddingBag, bag: _BagCall, source: _Source, output: Tensor) -> Tensor:
        """What a bag returns, computed from the vectors put in place of its lookup's rows.

        The reduction runs as calls that ``FunctionalCapture`` explains (a sum or an ``index_add``
        split proportionally, the mean's count and ``per_sample_weights`` held constant).
        """
        with hooks_suspended(), torch._C.DisableTorchFunction():
            _check_bag(name, module, bag)
            rows = F.embedding(bag.lookup, module.weight, max_norm=module.max_norm, norm_type=module.norm_type)
            rows = self._lookup(name, type(module).__name__, source, rows.detach())
        return _reduced(module, bag, rows, output.shape[0])

    def _lookup(self, name: str, kind: str, source: _Source, output: Any) -> Tensor:
        """The vectors put in place of the lookup's ``output`` (raises :class:`_Found` when all are kept)."""
        position, positions = source
        seen = self._seen.setdefault(position, [])
        seen.append(name)
        if len(seen) > 1:
            raise ValueError(
                f"lrpkit: the token ids{_which(position, self._count)} are looked up more than once in one "
                f"forward pass (by {', '.join(repr(each) for each in seen)}); only one lookup can be "
                "explained. Explain from the embeddings instead: run the rest of the model on a "
                "floating-point tensor of them"
            )
        ids = self._ids[position]
        if not isinstance(output, Tensor) or output.shape[:-1] != positions.shape:
            raise ValueError(
                f"lrpkit: embedding {name!r} ({kind}) looked up ids of shape "
                f"{tuple(positions.shape)} but returned {_shape_of(output)}; lrpkit needs one vector "
                "per id (shape (*ids.shape, dim))"
            )
        if self._keep:
            kept = output.new_zeros((ids.numel(), output.shape[-1]))
            kept[positions.reshape(-1).long()] = output.detach().reshape(-1, output.shape[-1])
            self._kept[position] = kept.view(*ids.shape, output.shape[-1])
            if len(self._kept) == len(self._ids):
                raise _Found
            return output
        with torch.enable_grad():  # also where the model looks its ids up under torch.no_grad()
            return _placed(self._vectors[position], positions, output)


class _LookupMode(TorchFunctionMode):
    """Sends each ``F.embedding`` call to :meth:`TokenLookup.embedding` (the rest runs as it is)."""

    def __init__(self, lookup: TokenLookup) -> None:
        super().__init__()
        self.lookup = lookup

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if hooks_are_suspended():
            return func(*args, **kwargs)
        if func is F.embedding:
            return self.lookup.embedding(args, kwargs)
        result = func(*args, **kwargs)
        index = _rows_index(func, args, kwargs)
        if index is not None:
            looked_up = self.lookup.rows(args[0], index, result)
            if looked_up is not result:
                return looked_up
        self.lookup.follow(func, args, kwargs, result)  # (ids[order] moves the ids)
        return result


#: ``torch.index_select(table, 0, ids)`` and ``table.index_select(0, ids)``.
_INDEX_SELECTS = (torch.index_select, Tensor.index_select)


def _rows_index(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The index of a call that picks rows of a tensor by an index tensor: ``table[index]``,
    ``table.index_select(0, index)``; ``None`` for any other call."""
    if func is Tensor.__getitem__ and len(args) == 2:
        return args[1]
    if func in _INDEX_SELECTS and args and (args[1] if len(args) > 1 else kwargs.get("dim")) == 0:
        return args[2] if len(args) > 2 else kwargs.get("index")
    return None


def _raw_tables(model: nn.Module) -> dict[int, str]:
    """Embedding tables that are parameters or buffers of modules other than layers (read as ``table[ids]``), by name.

    A 2-D floating tensor of a module that is no ``nn.Linear``, convolution, ``nn.Embedding``
    or ``nn.EmbeddingBag`` (whose weights are no tables to index, or are found as such).
    """
    layers = (nn.Linear, nn.Bilinear, nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd)
    return {
        id(tensor): f"{name}.{key}" if name else key
        for name, module in model.named_modules()
        if not isinstance(module, layers)
        for key, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
        if tensor.dim() == 2 and tensor.is_floating_point()
    }


def _contiguous(args: Sequence[Any], positions: Sequence[int]) -> tuple[Any, ...]:
    """``args`` with the ids at ``positions`` contiguous (so that a view's strides index them)."""
    return tuple(arg.contiguous() if index in positions else arg for index, arg in enumerate(args))


def _which(position: int, count: int) -> str:
    """`` (input 1)`` for one of several inputs, nothing for the only one."""
    return f" (input {position})" if count > 1 else ""


@dataclass
class _BagCall:
    """The arguments of an ``nn.EmbeddingBag`` call."""

    lookup: Tensor
    offsets: Tensor | None
    weights: Tensor | None


def _bag_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _BagCall:
    values = dict(zip(("input", "offsets", "per_sample_weights"), args), **kwargs)
    return _BagCall(values["input"], values.get("offsets"), values.get("per_sample_weights"))


def _check_bag(name: str, module: nn.EmbeddingBag, bag: _BagCall) -> None:
    if module.mode not in ("sum", "mean"):
        raise ValueError(
            f"lrpkit: embedding bag {name!r} reduces with mode={module.mode!r}; token ids are explained "
            "through bags with mode 'sum' or 'mean'"
        )
    if bag.lookup.dim() == 1 and bag.offsets is None:
        raise ValueError(f"lrpkit: embedding bag {name!r} was called with 1-D ids and no offsets")


def _kept_rows(module: nn.EmbeddingBag, bag: _BagCall) -> Tensor:
    """Whether each looked-up id counts in its bag (``padding_idx`` does not)."""
    if module.padding_idx is None:
        return torch.ones_like(bag.lookup, dtype=torch.bool)
    return bag.lookup != module.padding_idx


def _reduced(module: nn.EmbeddingBag, bag: _BagCall, rows: Tensor, count: int) -> Tensor:
    """The ``count`` bags' sums or means of ``rows`` (one per looked-up id) without the padding."""
    with torch._C.DisableTorchFunction():
        kept = _kept_rows(module, bag).to(rows.dtype)
        index = _bag_index(bag, count) if bag.lookup.dim() == 1 else None
        sizes = kept.sum(-1) if index is None else kept.new_zeros(count).index_add(0, index, kept)
        divisor = sizes.clamp(min=1).unsqueeze(-1)
        factors = kept if bag.weights is None else kept * bag.weights.detach()
    rows = rows * factors.unsqueeze(-1)
    total = rows.sum(-2) if index is None else rows.new_zeros(count, rows.shape[-1]).index_add(0, index, rows)
    return total / divisor if module.mode == "mean" else total


def _bag_index(bag: _BagCall, count: int) -> Tensor:
    """For flat ids with offsets: the bag of each id."""
    assert bag.offsets is not None
    starts = bag.offsets[:count]
    return torch.searchsorted(starts, torch.arange(bag.lookup.numel(), device=starts.device), right=True) - 1


def _placed(vectors: Tensor | None, positions: Tensor, output: Tensor) -> Tensor:
    """``vectors`` (ids' layout) arranged as the lookup's ``output``: one row per looked-up id."""
    assert vectors is not None
    if vectors.shape[-1] != output.shape[-1]:
        raise ValueError(
            f"lrpkit: embedding vectors of size {vectors.shape[-1]} were given for a lookup of size "
            f"{output.shape[-1]}"
        )
    rows = vectors.reshape(-1, vectors.shape[-1])[positions.reshape(-1).long()]
    return rows.view(output.shape).to(output.dtype)


def _is_view_of(lookup: Any, ids: Tensor) -> bool:
    """Whether ``lookup`` is ``ids`` or a view of its memory with the same dtype."""
    if not isinstance(lookup, Tensor) or lookup.dtype != ids.dtype or lookup.device != ids.device:
        return False
    if lookup is ids:
        return True
    return lookup.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr()


def _positions(lookup: Tensor, ids: Tensor) -> Tensor:
    """For each element of ``lookup`` (a view of the contiguous ``ids``), its flat index in ``ids``."""
    flat = torch.arange(ids.numel(), device=ids.device)
    if lookup is ids:
        return flat.view(ids.shape)
    if lookup.numel() == 0:
        return flat.new_empty(lookup.shape)
    offset = lookup.storage_offset() - ids.storage_offset()
    last = offset + sum((size - 1) * stride for size, stride in zip(lookup.shape, lookup.stride()) if size > 0)
    if offset < 0 or last >= ids.numel():
        raise ValueError(
            f"lrpkit: an embedding looked up a tensor of shape {tuple(lookup.shape)} that shares memory "
            f"with the token ids of shape {tuple(ids.shape)} but is not a view of them"
        )
    return flat.as_strided(lookup.shape, lookup.stride(), offset)


def _shape_of(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _not_looked_up(which: str) -> str:
    return (
        f"lrpkit: the input{which} holds integer token ids, but no embedding of the model looked them "
        "up in the forward pass (nor a view or copy of them). If the model computes other ids from "
        "them first (ids + 1, ids % n, torch.cat([cls, ids])), pass those; if it reads its embedding "
        "table another way than F.embedding, weight[ids] or weight.index_select(0, ids), explain from "
        "the embeddings: run the rest of the model on a floating-point tensor of them"
    )


#: Sub-word conventions: (marker, whether it marks a word's start rather than its continuation).
_SUBWORD_MARKERS = (("##", False), ("\u0120", True), ("\u2581", True))  # WordPiece, GPT-2's BPE, SentencePiece


def words(tokens: Sequence[str], relevance: Any) -> tuple[list[str], Tensor]:
    """Join sub-word tokens into words and add up their relevance (one sample).

    The tokenizer's convention is read off the tokens: WordPiece (BERT) marks a continuation with
    ``##``, GPT-2's byte-level BPE marks a word's start with ``Ġ``, SentencePiece (T5, Llama)
    with ``▁``; without any of these every token is a word. Special tokens (``[CLS]``, ``<s>``)
    stay words of their own. Relevance is additive, so a word's relevance is its tokens' sum.

    Parameters
    ----------
    tokens
        One sample's tokens, e.g. ``tokenizer.convert_ids_to_tokens(ids[0])``.
    relevance
        One value per token (a tensor or a sequence of floats).

    Returns
    -------
    tuple[list[str], Tensor]
        The words (markers removed) and their relevance, for :func:`lrpkit.image.text_heatmap`.

    Examples
    --------
    >>> words(["[CLS]", "un", "##believ", "##able", "film"], [0.0, 1.0, 2.0, 0.5, -1.0])
    (['[CLS]', 'unbelievable', 'film'], tensor([ 0.0000,  3.5000, -1.0000]))
    >>> words(["The", "\u0120un", "believ", "able"], [1.0, 1.0, 1.0, 1.0])[0]
    ['The', 'unbelievable']
    """
    values = torch.as_tensor(relevance).detach().reshape(-1)
    values = values if values.is_floating_point() else values.double()
    if len(tokens) != len(values):
        raise ValueError(f"got {len(tokens)} tokens but {len(values)} relevance values; give one value per token")
    marker, starts = next(
        ((mark, start) for mark, start in _SUBWORD_MARKERS if any(token.startswith(mark) for token in tokens)), ("", True)
    )
    joined: list[str] = []
    totals: list[Tensor] = []
    for token, value in zip(tokens, values):
        marked = bool(marker) and token.startswith(marker)
        new_word = not marker or not joined or _is_special(token) or _is_special(joined[-1]) or marked == starts
        text = token[len(marker):] if marked else token
        if new_word:
            joined.append(text)
            totals.append(value)
        else:
            joined[-1] += text
            totals[-1] = totals[-1] + value
    return joined, torch.stack(totals) if totals else values.new_zeros(0)


def _is_special(word: str) -> bool:
    return word.startswith(("[", "<")) and word.endswith(("]", ">"))


__all__ = ["TokenLookup", "is_token_ids", "words"]
