"""Hook machinery: attach a rule to one module, remove it, keep per-call state.

A rule is attached with a single forward hook. The hook routes the module's (already computed)
output through :class:`_RelevanceFunction`, an autograd Function whose ``forward`` hands the
output through unchanged and whose ``backward`` computes the rule's relevance for the module's
tensor inputs. The output handed on is detached from the module's own graph, so autograd never
runs the module's backward and never computes a parameter gradient.

Each forward call creates its own autograd node that holds that call's inputs (and output, when
the rule needs it) -- this is the per-call state: a module called twice in one forward (weight
sharing) gets the right inputs for each call, and the kept tensors are version-checked, so an
in-place change of a kept tensor raises instead of giving silently wrong numbers. A ReLU that
consumes a rule's output may lend its own output in place of it (:mod:`lrpkit.rectified`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .captured import SAMPLERS
from .ops import LayerOps, Params, hooks_are_suspended, hooks_suspended, layer_ops, with_values
from .rectified import (
    KeptOutput,
    certified,
    certified_arrivals,
    certify,
    certify_through_max_pool,
    inputs_to_save,
    is_plain_relu,
    lend,
    mark_saved,
    offer_recompute,
    proportional,
    recomputed_inputs,
    rectified_before,
    rectified_output_usable,
)


@dataclass
class LayerCall:
    """Everything a rule may use about one call of the module it is attached to.

    Attributes
    ----------
    name
        The module's qualified name in the model (``""`` for the root).
    module
        The module.
    inputs
        The tensor inputs that receive relevance (detached).
    output
        The module's real output (detached), or ``None`` when the rule said it does not need it.
    ops
        Modified forward and transposed product for this call (closed form where possible).
    known_nonnegative
        Per input: ``True`` when the forward graph guarantees it is ``>= 0`` (it comes from a
        ReLU, or a pooling or reshape of one); see :func:`produced_nonnegative`.
    output_rectified
        ``True`` when ``output`` is ``relu`` of the real output, lent by the ReLU after the
        module, and the relevance is zero wherever it is zero (see :mod:`lrpkit.rectified`).
        Only rules marked ``reads_output_only_where_relevant`` ever see this.
    padding
        Per input, for rules with ``reads_padding``: a boolean mask, ``True`` where the input
        holds a constant put there by an explicit ``F.pad``, a ``torch.cat`` with a constant
        part, an ``F.grid_sample`` outside its input or a max unpooling, or ``None`` (no such
        constant); see :meth:`padded`.
    relevance_at_zero_outputs
        ``True`` when relevance may have arrived where ``output`` is exactly zero: a rule that
        gives zero inputs relevance (``reads_padding``: z^B, flat, w^2) takes this module's output
        further on, and no certificate says the relevance is zero there (see
        :class:`~lrpkit.rules.Norm`).
    uncertified
        Set by a rule whose relevance, this time, is not zero wherever its input is (although
        its ``relevance`` is marked ``proportional_to_inputs``): no certificate is recorded.
    """

    name: str
    module: nn.Module
    inputs: tuple[Tensor, ...]
    output: Tensor | None
    ops: LayerOps
    known_nonnegative: tuple[bool, ...] = ()
    output_rectified: bool = False
    padding: tuple[Tensor | None, ...] = ()
    relevance_at_zero_outputs: bool = False
    uncertified: bool = False

    def padded(self, index: int) -> Tensor | None:
        """``True`` where input ``index`` holds a constant the model put around or beside it, else ``None`` (none).

        TF-style "same" padding pads before the layer (HF's MobileNets, timm's ``Conv2dSame``), and
        some models build a layer's input from shifted, padded copies (MobileBERT's trigram input)
        or next to a constant tensor (``torch.cat([x, zeros])``); a layer with its own padding never
        sees those positions. Rules that put relevance on inputs for what they could have been
        (z^B bounds, flat) treat them as the constants they are.
        """
        return self.padding[index] if index < len(self.padding) else None

    def params(self, zero: tuple[str, ...] = (), homogeneous: bool = False) -> Params:
        """The module's parameters, with those named in ``zero`` replaced by zeros.

        With ``homogeneous`` the caller promises to change the weights only in ways that commute
        with a non-negative scale per output channel (``f(W * c) = f(W) * c`` for ``c >= 0``:
        clamps at zero, sums of them, zeroing) and to build modified parameters with
        :func:`lrpkit.ops.with_values`. A layer with a BatchNorm merged into it then hands its
        own weight and the BatchNorm's scale (:class:`lrpkit.ops.ScaledParams`) instead of a new
        merged weight. Without it, the parameters are those of the merged layer, as they are.
        """
        params = self.ops.scaled_params() if homogeneous else self.ops.params()
        if not zero:
            return params
        zeroed = {key: torch.zeros_like(value) if key in zero else value for key, value in params.items()}
        return with_values(params, zeroed)

    def inputs_nonnegative(self) -> bool:
        """Whether every input is ``>= 0`` (the single-path shortcut of z+/gamma/alpha-beta).

        Inputs produced by a ReLU (or a pooling or reshaping of one) are known to be
        non-negative from the forward graph; the others are checked with one reduction each.
        """
        known = self.known_nonnegative or (False,) * len(self.inputs)
        return all(flag or _nonnegative(tensor) for flag, tensor in zip(known, self.inputs))

    def describe(self) -> str:
        """``'name' (Type)`` for error messages."""
        return f"'{self.name}' ({type(self.module).__name__})"


def _nonnegative(tensor: Tensor) -> bool:
    """``tensor >= 0`` everywhere (one min-reduction, cheaper than a comparison and ``any``)."""
    if tensor.numel() == 0:
        return True
    return bool(tensor.min() >= 0)


#: Autograd nodes whose output is never negative.
_NONNEGATIVE_NODES = frozenset({"ReluBackward0", "SigmoidBackward0", "SoftmaxBackward0", "ExpBackward0"})
#: Autograd nodes that keep the sign of their (first) input: non-negative in, non-negative out.
_SIGN_KEEPING_NODES = frozenset(
    {
        "MaxPool1DWithIndicesBackward0", "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0",
        "AvgPool1DBackward0", "AvgPool2DBackward0", "AvgPool3DBackward0",
        "AdaptiveAvgPool1DBackward0", "AdaptiveAvgPool2DBackward0", "AdaptiveAvgPool3DBackward0",
        "AdaptiveMaxPool2DBackward0", "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0",
        "CloneBackward0", "ExpandBackward0", "PermuteBackward0", "TransposeBackward0",
    }
)
#: Sign-keeping nodes whose output is a view of their input, or that save their input (so that a
#: change of it in place before the backward is an error there).
_IN_TIME_NODES = frozenset(
    {
        "MaxPool1DWithIndicesBackward0", "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0",
        "AdaptiveMaxPool2DBackward0", "ViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0",
        "PermuteBackward0", "TransposeBackward0",
    }
)
#: Modules (or captured calls, by ``op``) whose output is never negative.
_NONNEGATIVE_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Sigmoid, nn.Softmax)
_NONNEGATIVE_OPS = frozenset({"relu", "sigmoid", "softmax"})
_SIGN_KEEPING_OPS = frozenset({"flatten", "reshape", "view"})
_SIGN_KEEPING_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Identity,
)


def produced_nonnegative(tensor: Tensor, depth: int = 8) -> bool:
    """Whether the forward graph guarantees ``tensor >= 0`` (it comes from a ReLU, ...).

    Follows the autograd graph back through sign-keeping steps (pooling, reshapes, lrpkit's own
    rule nodes of pooling modules) to a node that cannot produce negative values. ``False``
    means "unknown", not "negative".
    """
    node = tensor.grad_fn
    # every step so far reads its input's memory or saved it: a rectification in place at the end
    # came before it (or the backward reports the change), so it saw the rectified values
    in_time = True
    for _ in range(depth):
        if node is None:
            return False
        name = type(node).__name__
        if name in _NONNEGATIVE_NODES:
            return True
        if in_time and rectified_before(node):
            return True
        pending = getattr(node, "pending", None)
        module = getattr(pending, "module", None)
        if module is not None:
            op = getattr(module, "op", None)
            if isinstance(module, _NONNEGATIVE_MODULES) or op in _NONNEGATIVE_OPS:
                return True
            if not (isinstance(module, _SIGN_KEEPING_MODULES) or op in _SIGN_KEEPING_OPS):
                return False
            if pending.known_nonnegative:  # judged when the node was made
                return pending.known_nonnegative[0]
            in_time = False
        elif name not in _SIGN_KEEPING_NODES:
            return False
        elif name not in _IN_TIME_NODES:
            in_time = False
        parents = node.next_functions
        if len(parents) != 1:
            return False
        node = parents[0][0]
    return False


def constant_padding(rule: Rule, args: Sequence[Any], positions: tuple[int, ...]) -> tuple[Tensor | None, ...]:
    """For a rule with ``reads_padding``: per input (``args[i]`` for ``i`` in ``positions``), where
    it holds constants (see :meth:`LayerCall.padded`)."""
    if not rule.reads_padding:
        return ()
    return tuple(constant_positions(args[index]) for index in positions)


def constant_positions(tensor: Tensor) -> Tensor | None:
    """``True`` where ``tensor`` holds a constant of an ``F.pad`` (constant mode), a ``torch.cat``
    part that carries no gradient, a zero a captured ``F.grid_sample`` read outside its input, or
    a zero ``F.max_unpool2d``/``3d`` put where no maximum was, following pads and concatenations
    (not other steps) back from its autograd node; ``None`` where there is none.

    Examples
    --------
    >>> x = torch.ones(1, 3, requires_grad=True)
    >>> constant_positions(torch.cat([torch.nn.functional.pad(x, (1, 0)), torch.zeros(1, 2)], dim=1))
    tensor([[ True, False, False, False,  True,  True]])
    >>> constant_positions(x * 2) is None
    True
    """
    try:
        mask = _constants_behind(tensor.grad_fn, tuple(tensor.shape), tensor.device, _CONSTANT_DEPTH)
    except (AttributeError, IndexError, RuntimeError):  # a node that does not record what is read here
        return None
    return mask if mask is not None and bool(mask.any()) else None


#: How many pads and concatenations :func:`constant_positions` follows back.
_CONSTANT_DEPTH = 4


def _constants_behind(node: Any, shape: tuple[int, ...], device: torch.device, depth: int) -> Tensor | None:
    """The constant positions of the output (of ``shape``) of ``node``; ``None``: none known."""
    name = type(node).__name__
    if depth == 0:
        return None
    if name == "ConstantPadNdBackward0":
        return _padded_constants(node, shape, device, depth)
    if name == "CatBackward0":
        return _concatenated_constants(node, shape, device, depth)
    if name in _UNPOOL_NODES:
        return _unpooled_constants(node, shape, device, _UNPOOL_NODES[name])
    pending = getattr(node, "pending", None)  # a rule node: a captured sampling
    if pending is not None and getattr(pending.module, "op", None) in SAMPLERS and len(node.input_shapes) == 1:
        return _unsampled(node, pending, device)
    return None


#: ``F.max_unpool2d``/``3d`` nodes and their spatial dimensions (``max_unpool1d`` runs the 2-D one
#: between reshapes, which are not followed).
_UNPOOL_NODES = {"MaxUnpool2DBackward0": 2, "MaxUnpool3DBackward0": 3}


def _unpooled_constants(node: Any, shape: tuple[int, ...], device: torch.device, spatial: int) -> Tensor:
    """Where a max unpooling wrote none of its input: zeros whatever the input (SegNet's decoders)."""
    indices = node._saved_indices.to(device)
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    leading = shape[:-spatial]
    mask.view(*leading, -1).scatter_(-1, indices.reshape(*leading, -1), False)
    return mask


def _unsampled(node: Any, pending: PendingCall, device: torch.device) -> Tensor:
    """Where a captured sampling read nothing of its input (outside it, with zero padding): the
    same call on ones gives zero there (with ``border`` or ``reflection`` padding, nowhere)."""
    (shape, dtype), = node.input_shapes
    args = list(pending.args)
    ones = torch.ones(shape, dtype=dtype, device=device)
    args[pending.input_positions[0]] = ones
    ops = pending.ops_factory(pending.module, tuple(args), pending.kwargs, pending.input_positions)
    with torch.no_grad(), hooks_suspended():
        covered = ops.forward((ones,), ops.params())
    return covered == 0


def _padded_constants(node: Any, shape: tuple[int, ...], device: torch.device, depth: int) -> Tensor | None:
    widths = tuple(_signed(width) for width in node._saved_pad)
    if not widths or min(widths) < 0:  # (negative widths crop)
        return None
    region = [slice(None)] * len(shape)
    for axis, (before, after) in enumerate(zip(widths[0::2], widths[1::2])):
        dim = len(shape) - 1 - axis
        region[dim] = slice(before, shape[dim] - after)
    inner_shape = tuple(len(range(*part.indices(size))) for part, size in zip(region, shape))
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    inner = _constants_behind(node.next_functions[0][0], inner_shape, device, depth - 1)
    mask[tuple(region)] = False if inner is None else inner
    return mask


def _signed(value: int) -> int:
    """An integer saved on an autograd node, which reads back as unsigned 64-bit: with its sign."""
    value = int(value)
    return value - 2**64 if value >= 2**63 else value


def _concatenated_constants(node: Any, shape: tuple[int, ...], device: torch.device, depth: int) -> Tensor | None:
    dim = _signed(node._saved_dim) % len(shape)
    sizes = [None if child is None else int(child._input_metadata[number].shape[dim]) for child, number in node.next_functions]
    unknown = [index for index, size in enumerate(sizes) if size is None]
    if len(unknown) > 1:  # several constant parts of unknown sizes
        return None
    if unknown:
        sizes[unknown[0]] = shape[dim] - sum(size for size in sizes if size is not None)
    shapes = [(*shape[:dim], size, *shape[dim + 1:]) for size in sizes]
    constants = [
        torch.ones(part, dtype=torch.bool, device=device)  # a part that carries no gradient: a constant
        if child is None
        else _constants_behind(child, part, device, depth - 1)
        for (child, _), part in zip(node.next_functions, shapes)
    ]
    if all(constant is None for constant in constants):
        return None
    parts = [torch.zeros(part, dtype=torch.bool, device=device) if constant is None else constant
             for constant, part in zip(constants, shapes)]
    return torch.cat(parts, dim=dim)


class Rule:
    """Base class of every rule: output relevance in, input relevance out.

    Subclasses implement :meth:`relevance`. Rules hold configuration only; the per-call state
    lives in the :class:`LayerCall` handed to them, so one rule instance may serve any number of
    modules.
    """

    #: Whether :meth:`relevance` reads ``call.output`` (then the output is kept for backward).
    needs_output: bool = False
    #: Whether :meth:`relevance` reads the values of ``call.inputs``. ``False``: the inputs are
    #: not kept for the backward (less memory), and ``call.inputs`` holds tensors on the
    #: ``meta`` device with the inputs' shapes and dtypes.
    needs_inputs: bool = True
    #: Whether the relevance at the (single, same-shaped) input is exactly the relevance at the
    #: output; the backward then skips building a :class:`LayerCall` (see :class:`~lrpkit.rules.Pass`).
    passes_relevance: bool = False
    #: Whether :meth:`relevance` reads ``call.padding`` (which inputs an explicit ``F.pad`` made).
    #: Such a rule gives relevance to inputs for what they could have been, zero inputs included.
    reads_padding: bool = False

    def relevance(self, call: LayerCall, relevance: Tensor) -> tuple[Tensor | None, ...]:
        """Relevance of each of ``call.inputs`` given the ``relevance`` at the module's output."""
        raise NotImplementedError

    def incoming(self, relevance: Tensor) -> Tensor:
        """The relevance the rule distributes, from what arrived at the output (default: all of it)."""
        return relevance

    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Session:
    """One registration of rules on a model; knows whether it is still open."""

    def __init__(self) -> None:
        self.active = True

    def require_active(self, call_name: str) -> None:
        """Raise when relevance is propagated after the composite's context was closed."""
        if not self.active:
            raise RuntimeError(
                f"lrpkit: the relevance backward reached module {call_name} after its composite "
                "context was closed. Run the backward (or the attributor) inside "
                "`with composite.context(model):`."
            )


RuleChoice = Callable[[nn.Module], "Rule | None"]
OpsFactory = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], tuple[int, ...]], LayerOps]


@dataclass
class PendingCall:
    """What the forward hook hands to the autograd Function for one call."""

    name: str
    module: nn.Module
    rule: Rule
    session: Session
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    input_positions: tuple[int, ...]
    output: Tensor | None = None
    ops_factory: OpsFactory = layer_ops
    known_nonnegative: tuple[bool, ...] = ()
    #: Whether the module ran under ``torch.autocast`` (its tensors may then differ in dtype).
    autocast: bool = False
    #: Per input, for rules with ``reads_padding``: see :attr:`LayerCall.padding`.
    padding: tuple[Tensor | None, ...] = ()
    #: Whether a rule with ``reads_padding`` takes the output further on (set by its :func:`route`).
    relevance_at_zero_outputs: bool = False


class _RelevanceFunction(torch.autograd.Function):
    """Hands a module's output through; its backward is the rule."""

    @staticmethod
    def forward(ctx: Any, pending: PendingCall, *inputs: Tensor) -> Tensor:  # type: ignore[override]
        output = pending.output
        assert output is not None
        pending.output = None  # the autograd node below holds it from here on
        positions = set(pending.input_positions)
        # the inputs live on only as saved tensors (or not at all, for rules that need none)
        pending.args = tuple(None if index in positions else arg for index, arg in enumerate(pending.args))
        ctx.pending = pending
        ctx.input_shapes = [(tensor.shape, tensor.dtype) for tensor in inputs]
        saved, ctx.recomputed = inputs_to_save(inputs) if pending.rule.needs_inputs else ((), None)
        ctx.save_for_backward(*saved)
        mark_saved(saved)
        # a detached alias: the node holding its own output would be a reference cycle
        ctx.kept_output = KeptOutput(output.detach()) if pending.rule.needs_output else None
        return output

    @staticmethod
    def backward(ctx: Any, relevance: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        pending: PendingCall = ctx.pending
        if not pending.session.active:
            pending.session.require_active(f"'{pending.name}' ({type(pending.module).__name__})")
        shapes = ctx.input_shapes
        if pending.rule.passes_relevance and len(shapes) == 1 and shapes[0][0] == relevance.shape:
            return (None, relevance)
        saved = ctx.saved_tensors
        if pending.rule.needs_inputs:
            inputs = tuple(saved[: len(ctx.input_shapes)])
            if ctx.recomputed is not None:
                inputs = recomputed_inputs(inputs, ctx.recomputed)
        else:  # shape and dtype only: tensors without data
            inputs = tuple(torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in ctx.input_shapes)
        if pending.autocast:
            return _under_autocast(ctx, pending, inputs, relevance)
        return _rule_backward(ctx, pending, inputs, relevance)


def _rule_backward(node: Any, pending: PendingCall, inputs: tuple[Tensor, ...], relevance: Tensor) -> tuple[Tensor | None, ...]:
    """The rule's relevance for ``inputs``: the backward of the rule node ``node``."""
    where = f"'{pending.name}' ({type(pending.module).__name__})"
    args = list(pending.args)
    for position, tensor in zip(pending.input_positions, inputs):
        args[position] = tensor
    ops = pending.ops_factory(pending.module, tuple(args), pending.kwargs, pending.input_positions)
    output, rectified = _output_for(node, relevance, ops, inputs, pending.rule, where)
    if output is not None and output.dtype != relevance.dtype:  # kept from a forward under autocast
        output = output.to(relevance.dtype)
    call = LayerCall(
        name=pending.name,
        module=pending.module,
        inputs=inputs,
        output=output,
        ops=ops,
        known_nonnegative=pending.known_nonnegative,
        output_rectified=rectified,
        padding=pending.padding,
        relevance_at_zero_outputs=pending.relevance_at_zero_outputs and not _certified_for(node, relevance, output, rectified),
    )
    with torch.no_grad():
        result = _checked(pending.rule.relevance(call, pending.rule.incoming(relevance)), inputs, pending.rule, where)
    if not call.uncertified:
        certify(pending.rule, result, inputs, node.next_functions)
    if node.kept_output is not None:
        # a tensor set on ctx lives as long as the graph; saved tensors go after their backward
        node.kept_output.release()
    return (None, *result)


def _mark_rule_nodes_behind(inputs: tuple[Tensor, ...]) -> None:
    """Mark every rule node that ``inputs`` were computed from: relevance may reach its output
    where that is zero (sent by a rule with ``reads_padding``). Up to :data:`_BEHIND_LIMIT` nodes
    of the graph are looked at; a first layer has few behind it. A node marked before had what
    is behind it marked then (flat on every layer walks each part of the graph once)."""
    stack = [tensor.grad_fn for tensor in inputs]
    seen: set[int] = set()
    while stack and len(seen) < _BEHIND_LIMIT:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        pending = getattr(node, "pending", None)
        if isinstance(pending, PendingCall):
            if pending.relevance_at_zero_outputs:
                continue
            pending.relevance_at_zero_outputs = True
        stack.extend(parent for parent, _ in node.next_functions)


#: How many autograd nodes :func:`_mark_rule_nodes_behind` looks at, at most.
_BEHIND_LIMIT = 10_000


def _certified_for(node: Any, relevance: Tensor, output: Tensor | None, rectified: bool) -> bool:
    """Whether ``relevance`` is known to be zero wherever ``output`` is: a lent ReLU output is
    only used so, and a certificate (:func:`lrpkit.rectified.certify`) says so for the output."""
    return output is not None and (rectified or certified(relevance, output, certified_arrivals(node)))


def _under_autocast(node: Any, pending: PendingCall, inputs: tuple[Tensor, ...], relevance: Tensor) -> tuple[Tensor | None, ...]:
    """The rule's backward for a module that ran under ``torch.autocast``.

    Autocast runs products in a lower precision, so the module's inputs, output and parameters
    may differ in dtype. The rule computes in the widest of them with autocast off, as it would
    without autocast; each input's relevance is handed back in that input's dtype. The other
    tensor arguments of the call count too: a captured ``F.linear``'s weight, for one.
    """
    others = tuple(arg for arg in pending.args if isinstance(arg, Tensor))
    dtype = _widest_dtype(pending.module, (*inputs, relevance, *others))
    widened = tuple(tensor.to(dtype) if tensor.is_floating_point() else tensor for tensor in inputs)
    with torch.autocast(relevance.device.type, enabled=False):
        result = _rule_backward(node, pending, widened, relevance.to(dtype))
    return (None, *(None if rel is None else rel.to(tensor.dtype) for rel, tensor in zip(result[1:], inputs)))


def _widest_dtype(module: nn.Module, tensors: tuple[Tensor, ...]) -> torch.dtype:
    """The floating dtype that holds every floating tensor and direct parameter of ``module``."""
    dtypes = [tensor.dtype for tensor in tensors if tensor.is_floating_point()]
    dtypes += [param.dtype for param in module.parameters(recurse=False) if param.is_floating_point()]
    return functools.reduce(torch.promote_types, dtypes)


def _output_for(
    node: Any, relevance: Tensor, ops: LayerOps, inputs: tuple[Tensor, ...], rule: Rule, where: str
) -> tuple[Tensor | None, bool]:
    """The output a rule reads (``None`` if it needs none) and whether it is the lent ReLU output.

    A lent ReLU output that cannot stand in for the output (relevance where it is zero) gives
    way to the output itself, recomputed with one forward of the layer; so does an output let go
    by an earlier backward through the same graph (``retain_graph=True``) or changed in place
    after the forward (``out[:, :3] += y``, by the model's code). ``node``: the rule
    node, which holds the kept output and counts the certified relevances sent to it.
    """
    kept: KeptOutput | None = node.kept_output
    if kept is None:
        return None, False
    if not kept.usable():
        if not rule.needs_inputs:
            raise RuntimeError(_output_gone_message(kept, rule, where))
        return _recomputed(ops, inputs), False
    output = kept.tensor
    assert output is not None
    if not kept.rectified:
        return output, False
    if rectified_output_usable(relevance, output, certified_arrivals(node)):
        return output, True
    return _recomputed(ops, inputs), False


def _output_gone_message(kept: KeptOutput, rule: Rule, where: str) -> str:
    """Why a rule that keeps no inputs cannot read its module's output."""
    if kept.tensor is None:
        return (
            f"lrpkit: rule {rule!r} on module {where} needs the layer's output but not its inputs, "
            "and the output was let go after the first backward through this graph; run the "
            "forward again for each backward"
        )
    what = "the output of its ReLU" if kept.rectified else "its output"
    return (
        f"lrpkit: {what} of module {where} was modified by an in-place operation after the forward, "
        f"and rule {rule!r} keeps no inputs to compute it again; use out-of-place operations"
    )


def _recomputed(ops: LayerOps, inputs: tuple[Tensor, ...]) -> Tensor:
    """The layer's output, computed again with one forward."""
    with torch.no_grad():
        return ops.forward(inputs, ops.scaled_params())


def _checked(
    result: tuple[Tensor | None, ...], inputs: tuple[Tensor, ...], rule: Rule, where: str
) -> tuple[Tensor | None, ...]:
    """Make sure a rule returned one relevance of the right shape per input."""
    if len(result) != len(inputs):
        raise RuntimeError(
            f"lrpkit: rule {rule!r} on module {where} returned {len(result)} relevance tensors "
            f"for {len(inputs)} inputs"
        )
    for index, (rel, tensor) in enumerate(zip(result, inputs)):
        if rel is not None and rel.shape != tensor.shape:
            raise RuntimeError(
                f"lrpkit: rule {rule!r} on module {where} returned relevance of shape "
                f"{tuple(rel.shape)} for input {index} of shape {tuple(tensor.shape)}"
            )
    return result


class RuleHook:
    """The forward hook that attaches a rule to one module.

    Parameters
    ----------
    name
        The module's qualified name (used in error messages).
    choose
        ``module -> Rule | None``, asked at every call (lets a composite decide lazily, e.g. the
        first layer in execution order).
    session
        The registration this hook belongs to.
    """

    #: Marks lrpkit's own hooks, which never change a module's output before a rule sees it.
    lrpkit_hook = True

    def __init__(self, name: str, choose: RuleChoice, session: Session) -> None:
        self.name = name
        self.choose = choose
        self.session = session

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if hooks_are_suspended() or not torch.is_grad_enabled():
            return None
        # nothing below is part of the model's computation: lrpkit's hooks and torch-function modes
        # (FunctionalCapture's) stay out of it
        with hooks_suspended(), torch._C.DisableTorchFunction():
            rule = self.choose(module)
            if rule is None or (rule.passes_relevance and len(args) == 1 and output is args[0]):
                return None  # (the relevance of an unchanged input is its own: nothing to route)
            held = held_constant(module)
            positions = tuple(
                index
                for index, arg in enumerate(args)
                if isinstance(arg, Tensor) and arg.is_floating_point() and arg.requires_grad and index not in held
            )
            if not positions:
                return None
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"lrpkit: rule {rule!r} is attached to module '{self.name}' "
                    f"({type(module).__name__}), which returned {type(output).__name__}; rules need a "
                    "module with a single tensor output. Map this module to no rule, e.g. "
                    f"layer_map=[({type(module).__name__}, None)] (the calls in its forward are then "
                    "explained one by one), or put rules on its children instead."
                )
            pending = PendingCall(
                name=self.name,
                module=module,
                rule=rule,
                session=self.session,
                args=tuple(arg.detach() if isinstance(arg, Tensor) else arg for arg in args),
                kwargs=kwargs,
                input_positions=positions,
                output=output.detach(),
                known_nonnegative=tuple(produced_nonnegative(args[index]) for index in positions)
                if rule.needs_inputs
                else (),
                padding=constant_padding(rule, args, positions),
            )
            return route(pending, tuple(args[index] for index in positions))


def held_constant(module: nn.Module) -> tuple[int, ...]:
    """Positions of ``module``'s arguments that a rule on it holds constant (get no relevance).

    torchvision's ``DeformConv2d(input, offset, mask)``: where to sample and how much, as for
    the deformable convolution call (:class:`lrpkit.captured.Convolution`).
    """
    deformable = sys.modules.get("torchvision.ops.deform_conv")  # (no such module unless torchvision made it)
    if deformable is not None and isinstance(module, deformable.DeformConv2d):
        return (1, 2)
    return ()


def route(pending: PendingCall, inputs: tuple[Tensor, ...]) -> Tensor:
    """Hand ``pending.output`` on as a tensor whose backward applies ``pending.rule`` to ``inputs``.

    A ReLU whose rule passes relevance lends its output to the rule node before it, which then
    keeps it instead of its own output (:func:`lrpkit.rectified.lend`); another activation lets
    its consumers keep its input instead of its output (:func:`lrpkit.rectified.offer_recompute`).
    """
    assert pending.output is not None
    pending.autocast = _autocast_enabled(pending.output.device.type)
    if pending.rule.reads_padding:
        _mark_rule_nodes_behind(inputs)
    routed = _RelevanceFunction.apply(pending, *inputs)
    if proportional(pending.rule):  # its relevances will be certified: carry that back past max pooling
        for tensor in inputs:
            certify_through_max_pool(tensor)
    if len(inputs) == 1 and pending.rule.passes_relevance:
        if is_plain_relu(pending.module):
            lend(inputs[0], routed)
        else:
            offer_recompute(inputs[0], routed, pending)
    return routed


def _autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (never for devices without autocast, e.g. meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def attach(module: nn.Module, hook: RuleHook) -> RemovableHandle:
    """Register ``hook`` on ``module``; the handle removes it."""
    return module.register_forward_hook(hook, with_kwargs=True)


__all__ = ["LayerCall", "Rule", "RuleHook", "Session", "attach", "constant_padding", "constant_positions"]
