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

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

from .composites.maps import Composite

Target = Union[None, int, Sequence[int], Tensor, Callable[[Tensor], Tensor]]
OutputSelector = Union[None, int, str, Callable[[Any], Tensor]]


@dataclass
class Attribution:
    """The result of an attributor: unpacks as ``output, relevance``.

    Attributes
    ----------
    output
        The explained model output (the selected one for tuple/dict outputs), detached.
    relevance
        Relevance (or gradient) of each input feature, shaped like the input.
    """

    output: Tensor
    relevance: Tensor

    def __iter__(self) -> Iterator[Tensor]:
        yield self.output
        yield self.relevance


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
    return _one_hot(values, _class_indices(values, target)) * values


def _as_given(relevance: Tensor, output: Tensor, what: str) -> Tensor:
    if relevance.shape != output.shape:
        raise ValueError(
            f"{what} has shape {tuple(relevance.shape)} but the output has shape "
            f"{tuple(output.shape)}; a tensor target is the starting relevance and must be shaped "
            "like the output (use an int or a list of ints to pick classes)"
        )
    return relevance.to(output)


def _class_indices(output: Tensor, target: Target) -> Tensor:
    """One class index per sample, validated against the output's shape."""
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


def check_input(x: Any) -> None:
    """Raise a clear error for inputs that cannot carry relevance."""
    if not isinstance(x, Tensor):
        raise TypeError(f"the input must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"the input must be a floating-point tensor to carry relevance, got dtype {x.dtype}; "
            "convert it first, e.g. x.float()"
        )


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

    Examples
    --------
    >>> import torch
    >>> from lrpkit import composites
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False))
    >>> result = Gradient(model, composites.EpsilonPlus())(torch.rand(1, 3), target=1)
    >>> torch.allclose(result.relevance.sum(), result.output[0, 1], atol=1e-4)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        composite: Composite | None = None,
        output: OutputSelector = None,
    ) -> None:
        self.model = model
        self.composite = composite
        self.output = output

    def __call__(self, x: Tensor, target: Target = None) -> Attribution:
        """Explain ``x`` for ``target`` (see the module docstring for the target forms)."""
        check_input(x)
        context = self.composite.context(self.model) if self.composite is not None else nullcontext()
        with context, torch.enable_grad():
            return self._attribute(x, target)

    def _attribute(self, x: Tensor, target: Target) -> Attribution:
        inputs = x.detach().requires_grad_(True)
        output = select_output(self.model(inputs), self.output)
        start = initial_relevance(output, target)
        if not output.requires_grad:
            raise RuntimeError(
                "the selected output does not depend on the input through autograd (was the "
                "model run under torch.no_grad(), or is the output detached?)"
            )
        (relevance,) = torch.autograd.grad(output, inputs, start, allow_unused=True)
        if relevance is None:
            relevance = torch.zeros_like(inputs)
        return Attribution(output=output.detach(), relevance=relevance.detach())


__all__ = ["Attribution", "Gradient", "Target", "initial_relevance", "select_output"]
