"""Forward and transposed products of a layer under modified parameters.

Every LRP rule needs two things from the layer it is attached to: the modified forward
``z' = f(a'; theta')`` and the transposed product ``J_f(a'; theta')^T s`` (the input gradient of
the modified forward for an output gradient ``s``). :class:`LayerOps` provides both.

Closed forms exist for ``nn.Linear``, ``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d``
(any stride, padding, dilation, groups): the forward is one ``F.linear``/``F.conv*`` call, and
the transposed product is one ``aten.convolution_backward`` (input gradient only) or one
matrix product, computed lazily and without any autograd graph. Every other module falls back
to :class:`GenericOps`, which re-runs the module with modified parameters through
``torch.func.functional_call`` and takes the input gradient with autograd -- slower, but it makes
every rule work on every layer type.
"""

from __future__ import annotations

import inspect
import math
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.nn.modules import module as _module_file
from torch.overrides import TorchFunctionMode

from . import captured

Params = dict[str, Tensor]
#: ``(grad, owned=False) -> J^T grad`` per input; ``owned``: the caller lets the product overwrite ``grad``.
Transpose = Callable[..., tuple[Tensor | None, ...]]


class OutputScaling:
    """A BatchNorm merged into the layer before it without copying the layer's weight.

    The merged layer computes ``z * scale + shift`` per output channel, where ``z = W a + b`` is
    the layer's own output; as one affine layer that is ``W' = W * scale`` and
    ``b' = b * scale + shift`` (``bias``). :mod:`lrpkit.canonizers.batchnorm` registers one per
    merged layer (:func:`set_output_scaling`) and scales the layer's output with a forward hook.

    Parameters
    ----------
    scale, shift, bias
        Per output channel (1-D, in the weight's dtype). Where ``scale >= 0`` everywhere
        (``nonnegative``) the rules' weight modifications (clamps, sums of them, zeroing) commute
        with it, and the products apply it to outputs and output gradients; otherwise (only for a
        layer whose weight is computed at each call, which cannot take merged Parameters) the
        rules get the merged weight ``W * scale`` itself.
    channel_dims
        Trailing dimensions after the channel in the layer's output (0 for ``Linear``, whose
        channels are the last dimension; the number of spatial dimensions for a convolution).
    weight_scale
        ``scale`` shaped to multiply the layer's weight (``W * weight_scale`` is the merged
        weight); by default output channels first. A transposed convolution's weight holds its
        output channels in its second dimension, per group.
    """

    def __init__(
        self, scale: Tensor, shift: Tensor, bias: Tensor, channel_dims: int, weight_scale: Tensor | None = None
    ) -> None:
        shape = (-1, *([1] * channel_dims))
        self.scale = scale.reshape(shape)
        self.shift = shift.reshape(shape)
        self.bias = bias
        self.weight_scale = scale.reshape(-1, *([1] * (channel_dims + 1))) if weight_scale is None else weight_scale
        self.nonnegative = bool((scale >= 0).all())


class ScaledParams(dict[str, Tensor]):
    """A merged layer's parameters as its own weight and a per-channel output scale.

    ``{"weight": W, "bias": b'}`` with ``scale``: the layer is ``(W a) * scale + b'``. Rules whose
    weight modifications commute with a non-negative per-channel scale get these from
    ``LayerCall.params(..., homogeneous=True)`` and modify them with :func:`with_values`, which
    keeps the scale; the closed-form ops apply it to outputs and output gradients, so the merged
    weight is never materialised. A plain ``dict`` always holds the merged layer's weights as they
    are.
    """

    def __init__(self, values: dict[str, Tensor], scale: Tensor, weight_scale: Tensor) -> None:
        super().__init__(values)
        self.scale = scale
        self.weight_scale = weight_scale


def _with_scaling(params: Params, scaling: OutputScaling | None) -> Params:
    """A layer's own ``params`` with its output scaling (the merged bias in place of its own), if any."""
    if scaling is None:
        return params
    return ScaledParams({**params, "bias": scaling.bias}, scaling.scale, scaling.weight_scale)


def _materialized(params: Params) -> Params:
    """:class:`ScaledParams` as the merged layer's parameters, ``W * scale`` a new weight; others as given."""
    if not isinstance(params, ScaledParams):
        return params
    return {**params, "weight": params["weight"] * params.weight_scale}


def with_values(params: Params, values: dict[str, Tensor]) -> Params:
    """``values`` as parameters of the same kind as ``params`` (a :class:`ScaledParams` keeps its scale)."""
    if isinstance(params, ScaledParams):
        return ScaledParams(values, params.scale, params.weight_scale)
    return values


#: The merged layers whose BatchNorm is applied as an output scaling, by module.
_OUTPUT_SCALINGS: "weakref.WeakKeyDictionary[nn.Module, OutputScaling]" = weakref.WeakKeyDictionary()


def set_output_scaling(module: nn.Module, scaling: OutputScaling | None) -> None:
    """Register (or with ``None`` remove) ``module``'s output scaling."""
    if scaling is None:
        _OUTPUT_SCALINGS.pop(module, None)
    else:
        _OUTPUT_SCALINGS[module] = scaling


def output_scaling(module: nn.Module) -> OutputScaling | None:
    """The output scaling of a layer merged with :class:`OutputScaling`, or ``None``."""
    return _OUTPUT_SCALINGS.get(module)

_state = threading.local()


class hooks_suspended:  # noqa: N801 - used like a function: ``with hooks_suspended():``
    """Make lrpkit's hooks pass through while a rule re-runs a module itself.

    A class rather than a generator-based context manager: it is entered a few times per module
    call, where a generator's setup costs more than the rest.
    """

    def __enter__(self) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1

    def __exit__(self, *exception: object) -> None:
        _state.depth -= 1


def hooks_are_suspended() -> bool:
    """Whether a rule is currently re-running a module (hooks must not fire)."""
    return getattr(_state, "depth", 0) > 0


class LayerOps:
    """Modified forward and transposed product of one module call.

    Parameters
    ----------
    module
        The module the rule is attached to.
    args, kwargs
        The positional and keyword arguments of the call; tensor inputs that receive relevance
        sit at ``input_positions`` in ``args`` and are replaced by the rule's modified inputs.
    input_positions
        Indices in ``args`` of the tensors that receive relevance.
    """

    #: Whether :meth:`transpose` returns new tensors that a rule may overwrite in place.
    fresh: bool = False

    def __init__(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        input_positions: tuple[int, ...],
    ) -> None:
        self.module = module
        self.args = args
        self.kwargs = kwargs
        self.input_positions = input_positions
        self.scaling = output_scaling(module)

    def params(self) -> Params:
        """The module's own parameters (not its children's), detached; merged ones if it is scaled."""
        params = {name: param.detach() for name, param in self.module.named_parameters(recurse=False)}
        return _materialized(_with_scaling(params, self.scaling))

    def scaled_params(self) -> Params:
        """:meth:`params`, as :class:`ScaledParams` where the ops can apply the scale themselves."""
        return self.params()

    def forward(self, inputs: Sequence[Tensor], params: Params) -> Tensor:
        """Output of the module for ``inputs`` under ``params``."""
        return self.linearize(inputs, params)[0]

    def linearize(self, inputs: Sequence[Tensor], params: Params) -> tuple[Tensor, Transpose]:
        """Output for ``inputs`` under ``params`` and the transposed product at that point."""
        return _generic_linearize(self, inputs, params)

    def transpose(
        self, inputs: Sequence[Tensor], params: Params, grad: Tensor, owned: bool = False
    ) -> tuple[Tensor | None, ...]:
        """``J^T grad`` for each input, the Jacobian taken at ``inputs`` under ``params``.

        ``owned``: ``grad`` is the caller's and not read again, so the product may overwrite it.
        """
        return self.linearize(inputs, params)[1](grad)

    def without_bias(self, output: Tensor, params: Params) -> Tensor | None:
        """``output`` with the additive bias removed, or ``None`` when that is not closed-form."""
        return None

    def output_has_no_negative_zero(self) -> bool:
        """Whether the module's real output certainly holds no ``-0.0`` (``False``: unknown).

        Lets :func:`lrpkit.rules.stabilize` skip the pass that turns ``-0.0`` into ``+0.0``.
        """
        return False

    def computes_no_negative_zero(self, params: Params) -> bool:
        """Whether outputs of :meth:`forward`/:meth:`linearize` under ``params`` hold no ``-0.0``."""
        return False

    def arguments(self, inputs: Sequence[Tensor] | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's ``(args, kwargs)``, with ``inputs`` in place of the relevance inputs if given."""
        args = list(self.args)
        for position, tensor in zip(self.input_positions, inputs or ()):
            args[position] = tensor
        return tuple(args), self.kwargs

    def function(self) -> Callable[..., Any]:
        """What the call ran: the module's own ``forward`` (its real parameters, no hooks)."""
        return self.module.forward

    def call(self, inputs: Sequence[Tensor]) -> Any:
        """The call's output for ``inputs``, computed again (no graph, no hooks, no torch-function modes)."""
        args, kwargs = self.arguments(inputs)
        with torch.no_grad(), hooks_suspended(), torch._C.DisableTorchFunction():
            return self.function()(*args, **kwargs)


def _generic_linearize(
    ops: LayerOps, inputs: Sequence[Tensor], params: Params
) -> tuple[Tensor, Transpose]:
    """Re-run the module with modified parameters and take input gradients with autograd."""
    leaves = _leaves(inputs)
    args, kwargs = ops.arguments(leaves)
    with torch.enable_grad(), hooks_suspended():
        output = torch.func.functional_call(ops.module, params, args, kwargs)
    return _autograd_linearization(output, leaves, type(ops.module).__name__)


def _leaves(inputs: Sequence[Tensor]) -> list[Tensor]:
    return [tensor.detach().requires_grad_(True) for tensor in inputs]


def _autograd_linearization(output: Any, leaves: list[Tensor], what: str) -> tuple[Tensor, Transpose]:
    """``output`` (detached) and the transposed product ``grad -> J^T grad`` for ``leaves``."""
    if not isinstance(output, Tensor):
        raise TypeError(
            f"{what} returned {type(output).__name__}; LRP rules need a module with a single "
            "tensor output"
        )

    def transpose(grad: Tensor, owned: bool = False) -> tuple[Tensor | None, ...]:
        if not output.requires_grad:
            return tuple(torch.zeros_like(leaf) for leaf in leaves)
        grads = torch.autograd.grad(output, leaves, grad, allow_unused=True)
        return tuple(
            torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)
        )

    return output.detach(), transpose


class FunctionalOps(LayerOps):
    """Forward and transposed product of one captured functional call (no parameters).

    ``args`` are the call's flattened arguments (``torch.utils._pytree`` leaves of
    ``(args, kwargs)``), ``input_positions`` index the leaves that receive relevance, and
    ``spec`` rebuilds the call. Every other tensor argument (parameters, gates, divisors) is a
    constant of the linearisation.
    """

    def __init__(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        input_positions: tuple[int, ...],
        func: Callable[..., Any],
        spec: pytree.TreeSpec,
    ) -> None:
        super().__init__(module, args, kwargs, input_positions)
        self.func = func
        self.spec = spec

    def params(self) -> Params:
        return {}

    def arguments(
        self, inputs: Sequence[Tensor] | None = None, params: Params | None = None
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's ``(args, kwargs)`` rebuilt from its leaves, ``inputs`` in place of the relevance inputs.

        ``params``: the rule's parameters, for a call that has some (:class:`CapturedLayerOps`).
        """
        leaves, _ = super().arguments(inputs)
        args, kwargs = pytree.tree_unflatten(self._with_params(list(leaves), params), self.spec)
        return tuple(args), dict(kwargs)

    def _with_params(self, leaves: list[Any], params: Params | None) -> list[Any]:
        """``leaves`` with ``params`` in place of the call's own parameters (a plain call has none)."""
        return leaves

    def function(self) -> Callable[..., Any]:
        return self.func

    def transpose(
        self, inputs: Sequence[Tensor], params: Params, grad: Tensor, owned: bool = False
    ) -> tuple[Tensor | None, ...]:
        signs = self._sum_signs(grad)
        if signs is not None:
            return tuple(grad if sign > 0 else -grad for sign in signs)
        return super().transpose(inputs, params, grad)

    def _sum_signs(self, grad: Tensor) -> tuple[int, ...] | None:
        """For ``x + y`` / ``x - y`` of same-shaped tensors: the sign of each relevance input.

        The transposed product of such a sum is ``grad`` (or ``-grad``) for each input: no
        re-run of the call and no autograd graph. ``None`` for every other call.
        """
        op = getattr(self.module, "op", None)
        if op not in ("add", "sub") or len(self.args) != 2 or self.input_positions == ():
            return None
        if any(not isinstance(leaf, Tensor) or leaf.shape != grad.shape for leaf in self.args):
            return None
        signs = {0: 1, 1: -1 if op == "sub" else 1}
        return tuple(signs[position] for position in self.input_positions)

    def linearize(self, inputs: Sequence[Tensor], params: Params) -> tuple[Tensor, Transpose]:
        leaves = _leaves(inputs)
        args, kwargs = self.arguments(leaves, params)
        with torch.enable_grad(), hooks_suspended():
            output = self.func(*args, **kwargs)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            output = output[0]
        return _autograd_linearization(output, leaves, f"captured call {getattr(self.module, 'name', '')!r}")


class _BiasedOps(LayerOps):
    """Dense and convolutional layers: ``z_j = sum_i a_i w_ij + b_j``, closed forms.

    For a layer merged with an :class:`OutputScaling`, the parameters may come as
    :class:`ScaledParams`; the products then scale the output (forward) or the output gradient
    (transposed product) instead of the weight.
    """

    fresh = True

    def params(self) -> Params:
        return _materialized(self.scaled_params())

    def scaled_params(self) -> Params:
        params = _with_scaling(_weight_and_bias(self.module), self.scaling)
        return params if self.scaling is None or self.scaling.nonnegative else _materialized(params)

    def forward(self, inputs: Sequence[Tensor], params: Params) -> Tensor:
        chosen = self._merged_if_cheaper(params, 1, lambda: self.output_size(inputs[0], params))
        return self._product(inputs[0], chosen)

    def _product(self, input: Tensor, params: Params) -> Tensor:
        """``W a + b`` under ``params``, the scale applied to the output for :class:`ScaledParams`."""
        if isinstance(params, ScaledParams):
            return _scaled_output(self._affine(input, params["weight"], None), params)
        return self._affine(input, params["weight"], params.get("bias"))

    def _affine(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's own operation with ``weight`` and ``bias``."""
        raise NotImplementedError

    def output_size(self, input: Tensor, params: Params) -> int:
        """Number of elements of the layer's output for ``input``."""
        raise NotImplementedError

    def _merged_if_cheaper(self, params: Params, passes: int, output_size: Callable[[], int]) -> Params:
        """:class:`ScaledParams` as the merged layer's weights where that costs less.

        Applying the scale costs ``passes`` passes over an output of ``output_size()`` elements
        (``passes`` is 2 when one forward and one transposed product share the parameters);
        making the merged weight costs one pass over the weight, which is then let go with the
        parameters. Both are exact; the cheaper one is taken.
        """
        if not isinstance(params, ScaledParams) or params["weight"].numel() > passes * output_size():
            return params
        return _materialized(params)

    def output_has_no_negative_zero(self) -> bool:
        """True on the CPU for a standard layer, unhooked by others, whose bias holds no ``-0.0``.

        Under IEEE round-to-nearest a floating-point sum is ``-0.0`` only if every summand is
        ``-0.0``; the bias is a summand of every output, so a bias free of ``-0.0`` gives an output
        free of ``-0.0``. That holds for the output of the layer's own ``forward`` -- not for a
        subclass's ``forward`` or an output replaced by someone else's forward hook, which are
        therefore excluded -- and on the CPU, where subnormal results are not flushed to a signed
        zero unless ``torch.set_flush_denormal(True)`` was called (checked).
        """
        module = self.module
        if not isinstance(module, nn.Module):  # a captured call's CallLayer
            return False
        # the output of a merged layer is ``z * scale + shift``: ``shift`` is then the summand
        bias = getattr(module, "bias", None) if self.scaling is None else self.scaling.shift
        return (
            isinstance(bias, Tensor)
            and bias.device.type == "cpu"
            and standard_forward(module)
            and not _global_forward_hooks()
            and all(getattr(hook, "lrpkit_hook", False) for hook in module._forward_hooks.values())
            and not _flushes_denormals()
            and _free_of_negative_zero(bias)
        )

    def computes_no_negative_zero(self, params: Params) -> bool:
        """True on the CPU, without flushing of subnormals, for a bias that holds no ``-0.0``.

        The outputs of this class's own forward are ``W a + b`` (one library call, no hooks) or,
        for :class:`ScaledParams`, ``(W a) * scale + b`` (the bias added last), so the argument
        of :meth:`output_has_no_negative_zero` needs only the bias: every output is a
        floating-point sum with the bias as one summand.
        """
        bias = params.get("bias")
        if bias is None or bias.device.type != "cpu" or _flushes_denormals():
            return False
        return not bool(torch.signbit(bias).logical_and_(bias == 0).any())


#: The ``forward`` methods whose output is exactly ``W a + b`` (dense or convolution).
_STANDARD_FORWARDS = frozenset(
    cls.forward
    for cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
)
#: The convolutions' own ``_conv_forward`` methods (transposed ones inherit ``_ConvNd``'s, which
#: their ``forward`` does not call, or, in older torch releases, have none).
_STANDARD_CONV_FORWARDS = frozenset(
    {None}
    | {
        getattr(cls, "_conv_forward", None)
        for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    }
)


def standard_forward(module: nn.Module) -> bool:
    """Whether ``module`` computes ``W a + b`` with its own ``weight`` and ``bias`` (no overridden ``forward``)."""
    cls = type(module)
    return cls.forward in _STANDARD_FORWARDS and getattr(cls, "_conv_forward", None) in _STANDARD_CONV_FORWARDS


def _global_forward_hooks() -> bool:
    """Whether forward hooks for all modules are registered (they may replace any output)."""
    return bool(_module_file._global_forward_hooks)


class DenseOps(_BiasedOps):
    """Closed forms for ``nn.Linear``: ``z = a W^T + b`` and ``J^T s = s W``."""

    def _affine(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(input, weight, bias)

    def linearize(self, inputs: Sequence[Tensor], params: Params) -> tuple[Tensor, Transpose]:
        params = self._merged_if_cheaper(params, 2, lambda: self.output_size(inputs[0], params))
        weight, scale = params["weight"], _scale_of(params)
        output = self._product(inputs[0], params)
        return output, lambda grad, owned=False: (_scaled(grad, scale, owned) @ weight,)

    def transpose(
        self, inputs: Sequence[Tensor], params: Params, grad: Tensor, owned: bool = False
    ) -> tuple[Tensor, ...]:
        params = self._merged_if_cheaper(params, 1, grad.numel)
        return (_scaled(grad, _scale_of(params), owned) @ params["weight"],)

    def output_size(self, input: Tensor, params: Params) -> int:
        return input.numel() // max(1, input.shape[-1]) * params["weight"].shape[0]

    def without_bias(self, output: Tensor, params: Params) -> Tensor:
        bias = params.get("bias")
        return output if bias is None else output - bias


class ConvOps(_BiasedOps):
    """Closed forms for standard and transposed convolutions of any dimension.

    The forward is one ``F.conv{n}d`` / ``F.conv_transpose{n}d`` call; the transposed product is
    ``aten.convolution_backward`` with only the input gradient requested.
    """

    def __init__(self, module: nn.Module, *args: Any) -> None:
        super().__init__(module, *args)
        conv: Any = module
        self.dims = len(conv.kernel_size)
        self.transposed = bool(conv.transposed)
        self.stride = list(conv.stride)
        self.padding = list(conv.padding)
        self.dilation = list(conv.dilation)
        self.output_padding = list(conv.output_padding)
        self.groups = int(conv.groups)

    def output_size(self, input: Tensor, params: Params) -> int:
        weight = params["weight"]
        spatial = input.shape[-self.dims:]
        leading = input.numel() // max(1, math.prod(spatial) * input.shape[-self.dims - 1])
        kernel = weight.shape[2:]
        if self.transposed:
            channels = weight.shape[1] * self.groups
            sizes = [
                (size - 1) * stride - 2 * pad + dilation * (k - 1) + extra + 1
                for size, pad, dilation, k, stride, extra in zip(
                    spatial, self.padding, self.dilation, kernel, self.stride, self.output_padding
                )
            ]
        else:
            channels = weight.shape[0]
            sizes = [
                (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1
                for size, pad, dilation, k, stride in zip(spatial, self.padding, self.dilation, kernel, self.stride)
            ]
        return leading * channels * math.prod(sizes)

    def _affine(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return torch.convolution(
            input,
            weight,
            bias,
            self.stride,
            self.padding,
            self.dilation,
            self.transposed,
            self.output_padding,
            self.groups,
        )

    def linearize(self, inputs: Sequence[Tensor], params: Params) -> tuple[Tensor, Transpose]:
        params = self._merged_if_cheaper(params, 2, lambda: self.output_size(inputs[0], params))
        output = self._product(inputs[0], params)
        return output, lambda grad, owned=False: self.transpose(inputs, params, grad, owned)

    def transpose(
        self, inputs: Sequence[Tensor], params: Params, grad: Tensor, owned: bool = False
    ) -> tuple[Tensor, ...]:
        params = self._merged_if_cheaper(params, 1, grad.numel)
        grad_input = torch.ops.aten.convolution_backward(
            _scaled(grad, _scale_of(params), owned),
            inputs[0],
            params["weight"],
            None,
            self.stride,
            self.padding,
            self.dilation,
            self.transposed,
            self.output_padding,
            self.groups,
            [True, False, False],
        )[0]
        return (grad_input,)

    def without_bias(self, output: Tensor, params: Params) -> Tensor:
        bias = params.get("bias")
        if bias is None:
            return output
        return output - bias.view(-1, *([1] * self.dims))


# -- captured F.linear / F.conv* calls with constant weights -----------------------------------


def _linear_call(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> None:
    """The signature of ``F.linear`` (a builtin, not inspectable)."""


def _conv_call(
    input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1
) -> None:
    """The signature of ``F.conv1d``/``conv2d``/``conv3d``."""


def _conv_transpose_call(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    groups: int = 1,
    dilation: Any = 1,
) -> None:
    """The signature of ``F.conv_transpose1d``/``2d``/``3d``."""


def _addmm_call(input: Tensor, mat1: Tensor, mat2: Tensor, *, beta: Any = 1, alpha: Any = 1) -> None:
    """The signature of ``torch.addmm``: ``beta * input + alpha * mat1 @ mat2`` (GPT-2's ``Conv1D``)."""


def _grouped_mm_call(
    mat_a: Tensor, mat_b: Tensor, offs: Tensor | None = None, bias: Tensor | None = None, out_dtype: Any = None
) -> None:
    """The signature of ``torch._grouped_mm`` and ``F.grouped_mm`` (a mixture of experts' layers)."""


def _layer_signature(op: str) -> inspect.Signature:
    if op == "linear":
        return _SIGNATURES[_linear_call]
    if op == "addmm":
        return _SIGNATURES[_addmm_call]
    if op in GROUPED_MM_OPS:
        return _SIGNATURES[_grouped_mm_call]
    return _SIGNATURES[_conv_transpose_call if op.startswith("conv_transpose") else _conv_call]


_SIGNATURES = {
    function: inspect.signature(function)
    for function in (_linear_call, _conv_call, _conv_transpose_call, _addmm_call, _grouped_mm_call)
}

#: The names of the grouped matrix products (``torch._grouped_mm``, ``F.grouped_mm``).
GROUPED_MM_OPS = ("_grouped_mm", "grouped_mm")


def layer_call_is_dense(op: str, leaves: tuple[Any, ...], spec: pytree.TreeSpec) -> bool:
    """Whether a captured layer call has the form its closed forms cover.

    ``torch.addmm`` must be ``F.linear(mat1, mat2.T, input)`` (``beta`` and ``alpha`` 1); a
    grouped product must be a mixture of experts' layer (:class:`GroupedDenseOps`): a 2-D input,
    3-D weights, offsets, no bias and no output dtype of its own. Other calls always are.
    """
    if op == "addmm":
        bound = _bound(_SIGNATURES[_addmm_call], leaves, spec)
        return all(not isinstance(bound[name], Tensor) and bound[name] == 1 for name in ("beta", "alpha"))
    if op in GROUPED_MM_OPS:
        bound = _bound(_SIGNATURES[_grouped_mm_call], leaves, spec)
        a, b, offs = bound["mat_a"], bound["mat_b"], bound["offs"]
        shapes = isinstance(a, Tensor) and isinstance(b, Tensor) and a.ndim == 2 and b.ndim == 3
        return shapes and isinstance(offs, Tensor) and bound["bias"] is None and bound["out_dtype"] is None
    return True


class CallLayer:
    """The layer that one ``F.linear``/``F.conv*`` call computes.

    It has the attributes :class:`DenseOps` and :class:`ConvOps` read from a module: ``weight``,
    ``bias``, and for a convolution ``kernel_size``, ``transposed``, ``stride``, ``padding``
    (``None`` for ``"same"`` padding that is not symmetric), ``dilation``, ``output_padding`` and
    ``groups``. ``settings``: the call's arguments other than input, weight and bias (``None``
    for ``F.linear``).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, settings: dict[str, Any] | None = None) -> None:
        self.weight = weight
        self.bias = bias
        if settings is None:  # F.linear
            return
        dims = weight.ndim - 2
        self.kernel_size = tuple(weight.shape[2:])
        self.transposed = "output_padding" in settings
        self.stride = _per_dim(settings["stride"], dims)
        self.dilation = _per_dim(settings["dilation"], dims)
        self.output_padding = _per_dim(settings.get("output_padding", 0), dims)
        self.groups = int(settings["groups"])
        self.padding = _numeric_padding(settings["padding"], self.kernel_size, self.dilation)


def _per_dim(value: Any, dims: int) -> tuple[int, ...]:
    """A convolution setting given as one int or one per spatial dimension, as a tuple per dimension."""
    return (int(value),) * dims if isinstance(value, int) else tuple(int(item) for item in value)


def _numeric_padding(padding: Any, kernel_size: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, ...] | None:
    """Zero padding per spatial dimension; ``None`` for ``"same"`` padding that is not symmetric."""
    if padding == "valid":
        return (0,) * len(kernel_size)
    if padding == "same":
        totals = [step * (size - 1) for size, step in zip(kernel_size, dilation)]
        return None if any(total % 2 for total in totals) else tuple(total // 2 for total in totals)
    return _per_dim(padding, len(kernel_size))


def captured_layer_ops(
    module: nn.Module,
    leaves: tuple[Any, ...],
    input_positions: tuple[int, ...],
    func: Callable[..., Any],
    spec: pytree.TreeSpec,
    op: str | None = None,
) -> LayerOps:
    """The ops of an ``F.linear``/``F.conv*``/``torch.addmm``/grouped product call: :class:`DenseOps`/:class:`ConvOps`/:class:`GroupedDenseOps`.

    ``leaves``: the call's flattened arguments (as for :class:`FunctionalOps`), the input at
    ``input_positions``; ``op``: the call's name (default: ``module.op``, a captured call's). A
    convolution with ``"same"`` padding that is not symmetric gets :class:`CapturedLayerOps`
    (the same rules, computed by re-running the call).
    """
    op = op or getattr(module, "op", "")
    if op == "deform_conv2d":  # torchvision's (input, weight, offset, mask, bias, ...): no closed form
        return CapturedLayerOps(module, leaves, {}, input_positions, func, spec, weight_leaf=1, bias_leaf=4)
    signature = _layer_signature(op)
    bound = _bound(signature, leaves, spec)
    if op in GROUPED_MM_OPS:
        return GroupedDenseOps(CallLayer(bound["mat_b"].detach(), None), bound["mat_a"], bound["offs"], func)
    if op == "addmm":  # input + mat1 @ mat2 is F.linear(mat1, mat2.T, input)
        bound = {"input": bound["mat1"], "weight": bound["mat2"].t(), "bias": bound["input"]}
    weight, bias = bound["weight"], bound["bias"]
    dense = op in ("linear", "addmm")
    settings = None if dense else {name: bound[name] for name in signature.parameters if name not in ("input", "weight", "bias")}
    layer = CallLayer(weight.detach(), None if bias is None else bias.detach(), settings)
    if dense:
        return DenseOps(layer, (bound["input"],), {}, (0,))
    if layer.padding is not None:
        return ConvOps(layer, (bound["input"],), {}, (0,))
    indices = _bound(signature, tuple(range(len(leaves))), spec)
    return CapturedLayerOps(module, leaves, {}, input_positions, func, spec, indices["weight"], indices["bias"])


class GroupedDenseOps(LayerOps):
    """Closed forms for a mixture of experts' ``torch._grouped_mm(x, W, offs=offs)``.

    Rows ``offs[g-1]:offs[g]`` of ``x`` (the tokens routed to expert ``g``) are multiplied by
    ``W[g]`` (``in x out``): a dense layer per expert, ``z = x W_g`` and ``J^T s = s W_g^T``,
    computed by the same grouped product. The weight is the layer's parameter for the rules
    (``W+`` for z+, ...); transformers' default experts (``experts_implementation="grouped_mm"``)
    call it.
    """

    fresh = True

    def __init__(self, layer: CallLayer, input: Tensor, offs: Tensor, func: Callable[..., Any]) -> None:
        super().__init__(layer, (input,), {}, (0,))  # type: ignore[arg-type]  # a CallLayer, as for DenseOps
        self.offs = offs
        self.func = func

    def params(self) -> Params:
        return {"weight": self.module.weight}

    def forward(self, inputs: Sequence[Tensor], params: Params) -> Tensor:
        return self.func(inputs[0], params["weight"], offs=self.offs)

    def linearize(self, inputs: Sequence[Tensor], params: Params) -> tuple[Tensor, Transpose]:
        return self.forward(inputs, params), lambda grad, owned=False: self.transpose(inputs, params, grad, owned)

    def transpose(
        self, inputs: Sequence[Tensor], params: Params, grad: Tensor, owned: bool = False
    ) -> tuple[Tensor, ...]:
        return (self.func(grad, params["weight"].transpose(-2, -1), offs=self.offs),)

    def without_bias(self, output: Tensor, params: Params) -> Tensor:
        return output


def _bound(signature: inspect.Signature, leaves: tuple[Any, ...], spec: pytree.TreeSpec) -> dict[str, Any]:
    """The call rebuilt from ``leaves``, by parameter name (defaults filled in)."""
    args, kwargs = pytree.tree_unflatten(list(leaves), spec)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class CapturedLayerOps(FunctionalOps):
    """A captured layer call re-run with the rule's parameters (no closed form, e.g. asymmetric ``"same"`` padding).

    ``weight_leaf`` and ``bias_leaf`` index the weight and bias among the call's leaves.
    """

    def __init__(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        input_positions: tuple[int, ...],
        func: Callable[..., Any],
        spec: pytree.TreeSpec,
        weight_leaf: int,
        bias_leaf: int,
    ) -> None:
        super().__init__(module, args, kwargs, input_positions, func, spec)
        self.weight_leaf = weight_leaf
        self.bias_leaf = bias_leaf

    def params(self) -> Params:
        bias = self.args[self.bias_leaf]
        params = {"weight": self.args[self.weight_leaf].detach()}
        return params if bias is None else {**params, "bias": bias.detach()}

    def _with_params(self, leaves: list[Any], params: Params | None) -> list[Any]:
        if params is not None:
            leaves[self.weight_leaf], leaves[self.bias_leaf] = params["weight"], params.get("bias")
        return leaves


def _scaled_output(product: Tensor, params: ScaledParams) -> Tensor:
    """``product * scale + bias`` (the bias added last), ``product`` being ``W a`` without bias."""
    scaled = product.mul_(params.scale)  # in place: a broadcasting addcmul is several times slower
    bias = params.get("bias")
    return scaled if bias is None else scaled.add_(bias.view(params.scale.shape))


def _scale_of(params: Params) -> Tensor | None:
    """The output scale of :class:`ScaledParams`, ``None`` for plain parameters."""
    return params.scale if isinstance(params, ScaledParams) else None


def _scaled(grad: Tensor, scale: Tensor | None, owned: bool) -> Tensor:
    """``grad * scale`` (the transposed product of the output scaling), in place if ``owned``."""
    if scale is None:
        return grad
    return grad.mul_(scale) if owned else grad * scale


def _free_of_negative_zero(tensor: Tensor) -> bool:
    """``tensor`` has no ``-0.0`` entry; cached per tensor until it is changed in place."""
    key = id(tensor)
    cached = _NEGATIVE_ZERO_FREE.get(key)
    if cached is not None and cached[0]() is tensor and cached[1] == tensor._version:
        return cached[2]
    with torch.no_grad():
        free = not bool(torch.signbit(tensor).logical_and_(tensor == 0).any())
    reference = weakref.ref(tensor, lambda _: _NEGATIVE_ZERO_FREE.pop(key, None))
    _NEGATIVE_ZERO_FREE[key] = (reference, tensor._version, free)
    return free


#: ``id(tensor) -> (weak reference, version, free of -0.0)`` (tensors compare element-wise, so
#: they cannot be the keys of a ``WeakKeyDictionary``).
_NEGATIVE_ZERO_FREE: dict[int, tuple["weakref.ReferenceType[Tensor]", int, bool]] = {}


def _flushes_denormals() -> bool:
    """Whether this thread flushes subnormal results to zero (``torch.set_flush_denormal(True)``).

    The flag lives in the CPU's floating-point control register, which Python's own float
    arithmetic obeys too: half the smallest normal double is ``0.0`` only when flushing is on.
    """
    return _SMALLEST_NORMAL * _HALF == 0.0


_SMALLEST_NORMAL = sys.float_info.min
_HALF = 0.5


def _weight_and_bias(module: nn.Module) -> Params:
    """``weight`` and (if present) ``bias`` of a dense or convolutional module, detached."""
    layer: Any = module
    params = {"weight": layer.weight.detach()}
    if layer.bias is not None:
        params["bias"] = layer.bias.detach()
    return params


def _has_closed_form_conv(module: nn.Module) -> bool:
    """Convolutions whose padding is numeric zero padding (other modes use the generic path)."""
    conv: Any = module
    return (
        isinstance(module, nn.modules.conv._ConvNd)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def layer_ops(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    input_positions: tuple[int, ...],
) -> LayerOps:
    """The fastest :class:`LayerOps` for ``module``: closed form where one exists.

    A dense or convolutional layer whose class overrides ``forward`` (a weight-standardised
    convolution, a scaled dense layer) is explained with the weight and bias its ``forward``
    actually passes to ``F.linear``/``F.conv*`` (:func:`_recorded_layer_call`), not with its
    parameters as they are; if its ``forward`` makes no such call on the input, the generic ops
    re-run it.
    """
    if not kwargs and input_positions == (0,) and len(args) == 1:
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not standard_forward(module):
            recorded = _recorded_layer_call(module, args[0])
            if recorded is not None:
                return captured_layer_ops(module, *recorded)
        elif isinstance(module, nn.Linear):
            return DenseOps(module, args, kwargs, input_positions)
        elif _has_closed_form_conv(module):
            return ConvOps(module, args, kwargs, input_positions)
    return LayerOps(module, args, kwargs, input_positions)


class _LayerCallFound(Exception):
    """Stops a layer's ``forward`` at its ``F.linear``/``F.conv*`` call (see :class:`_LayerCallRecorder`)."""


class _LayerCallRecorder(TorchFunctionMode):
    """Records the first ``F.linear``/``F.conv*`` call on ``input`` and stops the forward there."""

    def __init__(self, input: Tensor) -> None:
        super().__init__()
        self.input = input
        self.call: tuple[tuple[Any, ...], tuple[int, ...], Callable[..., Any], pytree.TreeSpec, str] | None = None

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in captured.LAYER_OPS and ((args and args[0] is self.input) or kwargs.get("input") is self.input):
            leaves, spec = pytree.tree_flatten((args, kwargs))
            position = next(index for index, leaf in enumerate(leaves) if leaf is self.input)
            self.call = (tuple(leaves), (position,), func, spec, name)
            raise _LayerCallFound
        return func(*args, **kwargs)


def _recorded_layer_call(
    module: nn.Module, input: Tensor
) -> tuple[tuple[Any, ...], tuple[int, ...], Callable[..., Any], pytree.TreeSpec, str] | None:
    """``(leaves, input positions, function, spec, op)`` of the layer call ``module.forward(input)`` makes.

    The forward runs (no grad, no hooks) up to that call and stops there; ``None`` if it makes
    none on ``input`` itself.
    """
    recorder = _LayerCallRecorder(input)
    with torch.no_grad(), hooks_suspended(), recorder:
        try:
            module.forward(input)
        except _LayerCallFound:
            pass
    return recorder.call
