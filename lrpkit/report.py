"""``lrpkit.describe``: every module and captured call, its rule, and the relevance reaching it.

Examples
--------
>>> import torch, lrpkit
>>> class Residual(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.linear = torch.nn.Linear(4, 4)
...     def forward(self, x):
...         return torch.flatten(x + torch.relu(self.linear(x)), 1)
>>> table = lrpkit.describe(Residual(), torch.rand(1, 4), composite="epsilon_plus")
>>> [row.name for row in table.rows]
['', 'linear', 'relu', 'add', 'flatten']
>>> table.rows[3].rule
'Norm(stabilizer=1e-06)'
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .attribution import (
    Inputs,
    OutputSelector,
    Target,
    _input_gradients,
    _requiring_grad,
    _Session,
    explained_inputs,
    initial_relevance,
)
from .canonizers import FunctionalCapture, MergeBatchNorm, NamedMergeBatchNorm
from .captured import CapturedOp
from .composites import Composite
from .composites import get_for_input
from .composites.maps import eager_module
from .ops import hooks_are_suspended


@dataclass
class Row:
    """One module call or captured call, in execution order.

    Attributes
    ----------
    name
        Module path or captured name (``""`` is the root module).
    kind
        The module's class name, or the kind of the captured call with its op (``Add: add``).
    rule
        The rule's ``repr``, ``"gradient"`` for a call without rule, ``"-"`` for a container or
        a module without a rule whose captured calls (the rows below it) have the rules, or
        ``"lookup"`` for an embedding (its ids are integers: relevance ends at its output).
    relevance
        Sum of the relevance that reached the output (over the batch and all calls of it);
        ``None`` when no relevance reached it.
    shape
        Shape of the output (of its first call).
    """

    name: str
    kind: str
    rule: str
    relevance: float | None = None
    shape: tuple[int, ...] | None = None


@dataclass
class Description:
    """The table :func:`describe` returns; ``str()`` renders it."""

    rows: list[Row] = field(default_factory=list)
    output: Tensor | None = None
    relevance: Tensor | tuple[Tensor, ...] | None = None

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def __str__(self) -> str:
        header = ("#", "name", "kind", "rule", "output shape", "relevance sum")
        lines = [
            (
                str(index),
                row.name or "(root)",
                row.kind,
                row.rule,
                "x".join(map(str, row.shape)) if row.shape else "",
                "" if row.relevance is None else f"{row.relevance:.6g}",
            )
            for index, row in enumerate(self.rows)
        ]
        return format_table(header, lines)


def format_table(header: Sequence[str], lines: Sequence[Sequence[str]], numbers_right: bool = False) -> str:
    """An aligned text table; ``numbers_right``: every column but the first right-aligned.

    Examples
    --------
    >>> print(format_table(("name", "sum"), [("conv", "1.5"), ("fc", "12.25")], numbers_right=True))
    name    sum
    conv    1.5
    fc    12.25
    """
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]

    def line(cells: Sequence[str]) -> str:
        aligned = [
            cell.rjust(width) if numbers_right and index else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths))
        ]
        return "  ".join(aligned).rstrip()

    return "\n".join(line(cells) for cells in (header, *lines))


def describe(
    model: nn.Module,
    x: Inputs,
    composite: str | Composite = "epsilon_plus_flat",
    target: Target = None,
    output: OutputSelector = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> Description:
    """Run one explanation of ``x`` and tabulate every module and captured call in execution order.

    For each row: the module or captured call, the rule it gets, the shape of its output and the
    sum of the relevance that reached that output. Use it to check which rule each part of a
    model gets, to find the names to put in a :class:`~lrpkit.composites.NameMapComposite`, and
    to see where relevance is lost (the sums of a conservative composite stay equal along the
    chain).

    Parameters
    ----------
    model
        The model (in ``eval()`` mode).
    x
        An input batch, or integer token ids (explained through the model's embedding, as the
        attributors do; ``.relevance`` then has one value per token), or a tuple of them for
        ``model(*x)`` (``.relevance`` is then a tuple).
    composite
        A preset name or a composite. For ``"epsilon_gamma_box"`` the bounds are ``x``'s min/max.
    target
        What to explain; see :mod:`lrpkit.attribution`.
    output
        For a model that returns a tuple or dict: which entry to explain (as for
        :class:`~lrpkit.attribution.Gradient`).
    model_kwargs
        Keyword arguments for the model call, not explained (``{"attention_mask": mask}``), as
        for the attributors.

    Returns
    -------
    Description
        ``.rows`` (a list of :class:`Row`), ``.output``, ``.relevance``; ``print()`` it for a table.
    """
    given = explained_inputs(x, model_kwargs=model_kwargs)
    model = eager_module(model)
    if isinstance(composite, str):
        composite = get_for_input(composite, x)
    table = Description()
    with _Session(model, composite, output, inputs=given) as session, ExitStack() as stack:
        inputs = _requiring_grad(session.explained())  # (the lookup of token ids is before the watching hooks)
        _watch_modules(model, composite, table, stack)
        for capture in (c for c in composite.canonizers if isinstance(c, FunctionalCapture)):
            stack.callback(capture.observe(model, _op_observer(table)).remove)
        explained = session.forward(inputs)
        gradients = _input_gradients(explained, inputs, initial_relevance(explained, target))
    table.output = explained.detach()
    table.relevance = given.packed(gradients)
    _add_merged_batchnorms(table, model, composite)
    return table


def _add_merged_batchnorms(table: Description, model: nn.Module, composite: Composite) -> None:
    """A row for each merged BatchNorm, after its layer's (it was out of the module tree meanwhile).

    Its output is the merged layer's: the same shape and relevance.
    """
    by_name = {row.name: row for row in table.rows}
    for layer, norm in _merged_pairs(model, composite):
        row = by_name.get(layer)
        if row is None or norm in by_name:  # (a BatchNorm with its own forward still runs: it has its row)
            continue
        merged = Row(norm, type(model.get_submodule(norm)).__name__, f"merged into '{layer}'", row.relevance, row.shape)
        table.rows.insert(table.rows.index(row) + 1, merged)


def _merged_pairs(model: nn.Module, composite: Composite) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` names merged by the composite's canonizers (after the context)."""
    pairs: list[tuple[str, str]] = []
    for canonizer in composite.canonizers:
        if isinstance(canonizer, MergeBatchNorm):
            pairs += canonizer.cached_pairs(model) or []
        elif isinstance(canonizer, NamedMergeBatchNorm):
            pairs += canonizer.pairs
    return pairs


def _watch_modules(model: nn.Module, composite: Composite, table: Description, stack: ExitStack) -> None:
    rows: dict[int, Row] = {}
    for name, module in model.named_modules():
        stack.callback(module.register_forward_pre_hook(_start(table, rows, name)).remove)
        stack.callback(module.register_forward_hook(_finish(table, rows, composite)).remove)


def _start(table: Description, rows: dict[int, Row], name: str) -> Any:
    def hook(module: nn.Module, args: Any) -> None:
        if id(module) not in rows and not hooks_are_suspended():
            rows[id(module)] = row = Row(name=name, kind=type(module).__name__, rule="")
            table.rows.append(row)

    return hook


def _finish(table: Description, rows: dict[int, Row], composite: Composite) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        row = rows.get(id(module))
        if row is None or row.shape is not None or hooks_are_suspended():
            return
        rule = composite.rule_of(module)
        if rule is not None:
            row.rule = repr(rule)
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            row.rule = "lookup"  # integer ids: relevance ends at its output
        else:
            # "-": the rules are those of its children or of its captured calls, the rows below it
            row.rule = "-" if any(True for _ in module.children()) or _has_call_rows(table, row) else "gradient"
        _watch_output(row, output)

    return hook


def _has_call_rows(table: Description, row: Row) -> bool:
    """Whether calls captured inside the module of ``row`` have rows after it."""
    prefix = f"{row.name}." if row.name else ""
    start = table.rows.index(row) + 1
    return any(":" in later.kind and later.name.startswith(prefix) for later in table.rows[start:])


def _op_observer(table: Description) -> Any:
    rows: dict[str, Row] = {}

    def observe(name: str, op: CapturedOp, rule: Any, output: Any) -> None:
        if name in rows:
            return
        rows[name] = row = Row(
            name=name, kind=f"{type(op).__name__}: {op.op}", rule="gradient" if rule is None else repr(rule)
        )
        table.rows.append(row)
        _watch_output(row, output)

    return observe


def _watch_output(row: Row, output: Any) -> None:
    tensor = output
    if isinstance(output, (tuple, list)):
        tensor = next((item for item in output if isinstance(item, Tensor)), None)
    if not isinstance(tensor, Tensor):
        return
    row.shape = tuple(tensor.shape)
    if tensor.requires_grad:
        tensor.register_hook(lambda grad: _accumulate(row, grad))


def _accumulate(row: Row, grad: Tensor | None) -> None:
    if grad is None:  # an output of a multi-output call (``chunk``, ``unbind``) that got no relevance
        return
    row.relevance = (row.relevance or 0.0) + float(grad.sum())


__all__ = ["Description", "Row", "describe"]
