"""The outputs rules keep for their backward, and the ReLU outputs that may stand in for them.

Epsilon, gamma, alpha-beta and the proportional rules divide the relevance at a layer's output
``z`` by ``z`` (stabilised). Keeping ``z`` for the backward costs one layer-sized tensor per
layer on top of what a plain gradient keeps, because ``z`` usually goes straight into a ReLU
whose output ``a = relu(z)`` is kept anyway, as the next layer's input.

``a`` can replace ``z`` exactly wherever the relevance is not zero:

* where ``z > 0``, ``a`` *is* ``z``, bit for bit;
* where ``z <= 0``, ``a == 0``, and the relevance arriving at ``z`` is zero there in every
  ordinary network -- the ReLU passes on the relevance of ``a``, and a rule that multiplies by
  its input (``R_i = a_i * ...``: epsilon, z+, gamma, alpha-beta, the proportional split)
  gives ``a_i = 0`` no relevance. A rule that reads its output only where the relevance is
  non-zero (marked with :func:`reads_output_only_where_relevant`) then computes the same
  numbers from ``a``.

So when a ReLU (with a rule that passes relevance unchanged) consumes a rule's output, it lends
its output to that rule's autograd node (:func:`lend`), which drops ``z``. In the backward
:func:`rectified_output_usable` checks the condition before the rule runs: either the relevance
carries a certificate (:func:`certify`) from a rule that multiplied it by this very tensor, or
one check over the values finds it zero wherever ``a`` is zero. When the check fails (another
consumer of ``z``, or a rule such as flat above the ReLU), the rule recomputes ``z`` with one
forward of its layer: the result is the same either way, only the cost differs.

The same idea spares the output of a smooth activation (GELU, SiLU, tanh, ...). A plain
gradient keeps the activation's *input* ``z`` (its derivative needs it), and so does the rule of
the layer that produced ``z``. The layer after the activation keeps its input ``f(z)`` for its
rule: a second tensor of the same size, which the gradient never keeps. So when an activation
whose rule passes relevance consumes the output a rule node keeps, it offers that output to its
consumers (:func:`offer_recompute`); a consumer keeps ``z`` instead of ``f(z)``
(:func:`inputs_to_save`) and computes ``f(z)`` again in its backward
(:func:`recomputed_inputs`): one element-wise pass for one layer-sized tensor less.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from . import captured, types

Method = TypeVar("Method", bound=Callable[..., Any])


def reads_output_only_where_relevant(method: Method) -> Method:
    """Mark a rule's ``relevance`` method: it reads ``call.output`` only where the relevance is non-zero.

    Where the relevance is zero such a rule gives zero (or the same value) whatever the output
    holds there, and stays finite; the ReLU output may then stand in for the output. A subclass
    that overrides ``relevance`` is not marked unless it says so itself.
    """
    method.reads_output_only_where_relevant = True  # type: ignore[attr-defined]
    return method


def proportional_to_inputs(method: Method) -> Method:
    """Mark a rule's ``relevance`` method: each input's relevance is that input times something.

    Its relevance is then exactly zero wherever its input is zero, which :func:`certify` records.
    """
    method.proportional_to_inputs = True  # type: ignore[attr-defined]
    return method


def proportional(rule: Any) -> bool:
    """Whether ``rule``'s relevance is certified zero wherever its input is (:func:`proportional_to_inputs`)."""
    return _marked(rule, "proportional_to_inputs")


def _marked(rule: Any, mark: str) -> bool:
    return bool(getattr(type(rule).relevance, mark, False))


class KeptOutput:
    """The output of one rule call as kept for its backward, or the ReLU output lent in its place.

    Holds a detached alias (no reference cycle through the autograd node) and the version it had
    when kept, so that an in-place change before the backward is detected.
    """

    __slots__ = ("tensor", "version", "rectified")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor: Tensor | None = tensor
        self.version = tensor._version
        self.rectified = False

    def borrow(self, rectified: Tensor) -> None:
        """Keep ``rectified`` (``relu`` of the kept output) instead; the output itself is let go."""
        self.tensor = rectified
        self.version = rectified._version
        self.rectified = True

    def release(self) -> None:
        """Let the kept tensor go once the backward has read it (autograd frees saved tensors so)."""
        self.tensor = None

    def usable(self) -> bool:
        """Whether the kept tensor is still there and unchanged by an in-place operation since it was kept."""
        return self.tensor is not None and self.tensor._version == self.version


def is_plain_relu(module: Any) -> bool:
    """An ``nn.ReLU`` (not a subclass) or a captured ``relu`` call: output ``max(z, 0)``."""
    return type(module) is nn.ReLU or (isinstance(module, captured.ReLU) and module.op == "relu")


def lend(source: Tensor, rectified: Tensor) -> None:
    """Let the rule node that produced ``source`` keep ``rectified = relu(source)`` instead of it.

    Only when ``source`` is exactly that node's output (not a view), the node still keeps the
    output itself, and its rule reads the output only where relevance flows.
    """
    kept = getattr(source.grad_fn, "kept_output", None)
    if not isinstance(kept, KeptOutput) or not _lendable(source, kept):
        return
    if rectified.shape != source.shape or rectified.dtype != source.dtype:
        return
    kept.borrow(rectified.detach())


def _lendable(source: Tensor, kept: KeptOutput) -> bool:
    """Whether ``kept`` (of the node that produced ``source``) may give way to ``relu(source)``."""
    if kept.rectified or source._base is not None:
        return False
    if not _marked(source.grad_fn.pending.rule, "reads_output_only_where_relevant"):  # type: ignore[union-attr]
        return False
    output = kept.tensor
    return not (
        output is None  # already let go by a backward through the node
        or output._version != kept.version  # changed in place: the backward computes it again
        or _layout(source) != _layout(output)
    )


def rectify_in_place(source: Tensor) -> bool:
    """``relu`` ``source`` in place, unrecorded, if it is the untouched output of a rule node.

    What an ``nn.ReLU(inplace=True)`` whose rule passes relevance does inside a context: the
    relevance then reaches the node unchanged, as the pass rule hands it on, with no node and
    no new tensor for the ReLU; a node that keeps its output keeps the rectified tensor
    (:func:`lend`), and consumers know it is non-negative (:func:`rectified_before`). ``False``
    (nothing done) when ``source`` is a view, not a rule node's output, or its node keeps an
    output it may not give up.
    """
    node = source.grad_fn
    if node is None or source._base is not None or getattr(node, "pending", None) is None:
        return False
    if getattr(node, "output_saved", False):  # a rule node saved it (or a view of it) as an input
        return False
    kept = node.kept_output
    if kept is not None and not _lendable(source, kept):
        return False
    with torch.no_grad():
        source.relu_()
    if kept is not None:
        kept.borrow(source.detach())
    node.rectified_output = True
    return True


def mark_saved(saved: tuple[Tensor, ...]) -> None:
    """Note on the rule nodes that produced ``saved`` (or the bases of views in it) that a rule node saved them.

    A rule node saves inputs the plain gradient may not (an average pool's, a sum's): an
    ``nn.ReLU(inplace=True)`` after such a consumer must not overwrite them (:func:`rectify_in_place`).
    """
    for tensor in saved:
        base = tensor if tensor._base is None else tensor._base
        node = base.grad_fn
        if getattr(node, "pending", None) is not None:
            node.output_saved = True  # type: ignore[union-attr]


def rectified_before(node: Any) -> bool:
    """Whether :func:`rectify_in_place` rectified the output of ``node``."""
    return getattr(node, "rectified_output", False)


# -- certificates: relevance known to be zero wherever a given tensor is zero -------------------
#: ``(weak reference to the relevance, its version, and the data pointer, shape, strides and dtype
#: of the tensor it is zero wherever ... is zero)``
Certificate = tuple["weakref.ReferenceType[Tensor]", int, tuple[Any, ...]]
_CERTIFIED: dict[int, Certificate] = {}


def certify(
    rule: Any, relevances: tuple[Tensor | None, ...], inputs: tuple[Tensor, ...], producers: tuple[Any, ...] = ()
) -> None:
    """Record that each relevance of a rule marked :func:`proportional_to_inputs` is zero where its input is.

    ``producers`` (the node's ``next_functions``, one per input): a rule node among them counts
    the certified relevances it is sent in this backward (:func:`certified_arrivals`).
    """
    if not _marked(rule, "proportional_to_inputs"):
        return
    for index, (relevance, tensor) in enumerate(zip(relevances, inputs)):
        if relevance is None or tensor.device.type == "meta":
            continue
        _record(relevance, _layout(tensor))
        if index < len(producers):
            _count_arrival(producers[index][0])


def _record(relevance: Tensor, layout: tuple[Any, ...]) -> None:
    """Certify ``relevance`` as zero wherever the tensor of ``layout`` is zero."""
    _keep_while_alive(_CERTIFIED, relevance, relevance._version, layout)


def _keep_while_alive(store: dict[int, Any], tensor: Tensor, *values: Any) -> None:
    """``store[id(tensor)] = (weak reference to tensor, *values)``, dropped when ``tensor`` dies.

    Tensors compare element-wise, so they cannot be the keys of a ``WeakKeyDictionary``; readers
    check that the weak reference still gives the same tensor.
    """
    key = id(tensor)
    reference = weakref.ref(tensor, lambda _, key=key: store.pop(key, None))  # type: ignore[misc]
    store[key] = (reference, *values)


#: Autograd nodes of max pooling (``_saved_self``: the pooled tensor).
_MAX_POOL_NODES = frozenset(
    {
        "MaxPool1DWithIndicesBackward0", "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0",
        "AdaptiveMaxPool1DBackward0", "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0",
    }
)


def certify_through_max_pool(pooled: Tensor) -> None:
    """Carry the certificates of the relevance at ``pooled`` back through the max pooling that made it.

    Called once for each consumer of ``pooled`` whose rule certifies its relevance. Max
    pooling's backward (the plain gradient, which LRP keeps for it) sends each output's relevance
    to the one input its maximum came from, which holds the same value. So a relevance at the
    output that is zero wherever the output is zero becomes one at the input that is zero
    wherever the input is zero, and the layer before the pooling may use a lent ReLU output
    without checking the values (:func:`rectified_output_usable`): no pass over them, and on a
    GPU no wait for the result. The relevance at the output must be the sum of the counted
    consumers' certified relevances alone (:func:`certified_arrivals` explains the version count).
    """
    entry = _POOL_CONSUMERS.get(id(pooled))
    if entry is not None and entry[0]() is pooled:
        entry[1][0] += 1
        return
    node = pooled.grad_fn
    if node is None or type(node).__name__ not in _MAX_POOL_NODES or pooled.device.type == "meta":
        return
    source = getattr(node, "_saved_self", None)
    if not isinstance(source, Tensor):
        return
    pooled_layout, source_layout, consumers = _layout(pooled), _layout(source), [1]

    def carry(grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]) -> None:
        relevance, carried = grad_outputs[0], grad_inputs[0]
        if relevance is not None and carried is not None and _certified_layout(relevance, pooled_layout, consumers[0]):
            _record(carried, source_layout)

    node.register_hook(carry)
    _keep_while_alive(_POOL_CONSUMERS, pooled, consumers)


#: ``id(pooled) -> (weak reference to it, [its consumers that certify their relevance])``
_POOL_CONSUMERS: dict[int, tuple["weakref.ReferenceType[Tensor]", list[int]]] = {}


def _count_arrival(node: Any) -> None:
    """Count one certified relevance sent to ``node`` in the running backward (rule nodes only)."""
    if getattr(node, "pending", None) is not None:
        node.certified_arrivals = (torch._C._current_graph_task_id(), _arrivals(node) + 1)


def _arrivals(node: Any) -> int:
    """The certified relevances counted for ``node`` in the running backward (none from another)."""
    counted = getattr(node, "certified_arrivals", None)
    return counted[1] if counted is not None and counted[0] == torch._C._current_graph_task_id() else 0


def certified_arrivals(node: Any) -> int:
    """How many certified relevances rule nodes sent ``node`` in the running backward; resets the count.

    Autograd adds the relevances that reach a node into the first one to arrive, in place when
    nothing else holds it (one version step per addition). So a certified relevance whose
    version moved by exactly ``arrivals - 1`` is the sum of the certified ones alone: zero
    wherever the tensor they were certified for is zero.
    """
    count = _arrivals(node)
    node.certified_arrivals = None
    return count


def _layout(tensor: Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same values: memory, shape, strides and dtype."""
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def certified(relevance: Tensor, rectified: Tensor, arrivals: int = 0) -> bool:
    """Whether ``relevance`` is a relevance certified zero wherever ``rectified`` is zero.

    Unchanged since, or changed only by autograd adding ``arrivals - 1`` further certified
    relevances into it (:func:`certified_arrivals`).
    """
    return _certified_layout(relevance, _layout(rectified), arrivals)


def _certified_layout(relevance: Tensor, layout: tuple[Any, ...], arrivals: int = 0) -> bool:
    """:func:`certified` for the tensor of ``layout``."""
    entry = _CERTIFIED.get(id(relevance))
    return (
        entry is not None
        and entry[0]() is relevance
        and relevance._version - entry[1] == max(arrivals - 1, 0)
        and entry[2] == layout
    )


def zero_where_zero(relevance: Tensor, rectified: Tensor) -> bool:
    """Whether ``relevance`` is exactly zero wherever ``rectified`` (``>= 0``) is zero.

    ``relevance - relevance * sign(rectified)`` is the relevance where ``rectified`` is zero and
    exactly zero elsewhere (NaN for NaN or infinite values, which fail the check): three passes
    without boolean tensors, which are slow on the CPU.
    """
    if relevance.shape != rectified.shape or relevance.dtype != rectified.dtype:
        return False
    leaked = torch.sign(rectified)
    torch.addcmul(relevance, relevance, leaked, value=-1, out=leaked)  # one new tensor, not two
    if leaked.numel() == 0:
        return True
    low, high = torch.aminmax(leaked)
    return bool((low == 0) & (high == 0))  # one read back to the host (a sync on a GPU), not two


def rectified_output_usable(relevance: Tensor, rectified: Tensor, arrivals: int = 0) -> bool:
    """Whether a lent ReLU output may stand in for the output, given the relevance that arrived.

    ``arrivals``: the certified relevances counted for the node (:func:`certified_arrivals`).
    """
    return certified(relevance, rectified, arrivals) or zero_where_zero(relevance, rectified)


# -- activations computed again from the output their producer keeps ---------------------------
#: Activations that may not be recomputed: random (RReLU), or holding a learnable parameter (PReLU),
#: or handled by lending (ReLU).
_NOT_RECOMPUTED: tuple[type[nn.Module], ...] = (nn.RReLU, nn.PReLU, nn.ReLU, captured.ReLU)
_NOT_RECOMPUTED_OPS = frozenset({"relu", "prelu"})


def _recomputable(pending: Any) -> bool:
    """An element-wise activation call that is a pure function of its input, cheap to compute again."""
    module = pending.module
    if not isinstance(module, types.Activation) or isinstance(module, _NOT_RECOMPUTED):
        return False
    if getattr(module, "inplace", False):  # (FunctionalCapture runs captured calls out of place)
        return False
    return not (isinstance(module, captured.CapturedOp) and module.op in _NOT_RECOMPUTED_OPS)


def offer_recompute(source: Tensor, activated: Tensor, pending: Any) -> None:
    """Let the consumers of ``activated`` (an activation of ``source``) keep ``source`` instead.

    Only when ``source`` is, unchanged, exactly the output its rule node keeps (so keeping it costs
    nothing more) and the activation (``pending.module``) can be computed again exactly.
    """
    kept = getattr(source.grad_fn, "kept_output", None)
    if not isinstance(kept, KeptOutput) or kept.rectified or kept.tensor is None:
        return
    output = kept.tensor
    if output._version != kept.version or _layout(source) != _layout(output) or not _recomputable(pending):
        return
    activated.grad_fn.recompute_from = (kept, _layout(activated), pending)  # type: ignore[union-attr]


def inputs_to_save(inputs: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[Any, ...] | None]:
    """The tensors a rule node saves for ``inputs``, and per input the activation to compute again.

    An input that is an offered activation output (:func:`offer_recompute`) is saved as the
    activation's input; ``None`` for the second item when every input is saved as it is.
    """
    saved = list(inputs)
    recipes: list[Any] | None = None
    for index, tensor in enumerate(inputs):
        offer = getattr(tensor.grad_fn, "recompute_from", None)
        if offer is None:
            continue
        kept, layout, pending = offer
        source = kept.tensor
        if source is None or source._version != kept.version or _layout(tensor) != layout:
            continue
        saved[index] = source
        if recipes is None:
            recipes = [None] * len(inputs)
        recipes[index] = pending
    return tuple(saved), None if recipes is None else tuple(recipes)


def recomputed_inputs(saved: tuple[Tensor, ...], recipes: tuple[Any, ...]) -> tuple[Tensor, ...]:
    """The inputs of a rule node, computing the activations :func:`inputs_to_save` replaced."""
    return tuple(tensor if pending is None else _activation_of(pending, tensor) for tensor, pending in zip(saved, recipes))


def _activation_of(pending: Any, source: Tensor) -> Tensor:
    """The output of the activation call ``pending`` for the input ``source``, computed again."""
    return pending.ops_factory(pending.module, pending.args, pending.kwargs, pending.input_positions).call([source])


__all__ = [
    "KeptOutput",
    "certified_arrivals",
    "certify",
    "certify_through_max_pool",
    "inputs_to_save",
    "is_plain_relu",
    "lend",
    "mark_saved",
    "offer_recompute",
    "proportional",
    "proportional_to_inputs",
    "reads_output_only_where_relevant",
    "recomputed_inputs",
    "rectified_before",
    "rectify_in_place",
    "rectified_output_usable",
    "zero_where_zero",
]
