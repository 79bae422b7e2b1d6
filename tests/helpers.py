"""Test helpers shared by several test files (imported as ``helpers``; ``tests/`` is on sys.path)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: Every per-module hook dict of ``nn.Module``; lrpkit must leave all of them empty.
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def hooks_left(model: nn.Module) -> list[tuple[str, str]]:
    """``(module name, hook dict)`` for every non-empty hook dict in ``model``."""
    return [
        (name, kind)
        for name, module in model.named_modules()
        for kind in HOOK_DICTS
        if len(getattr(module, kind, None) or {})
    ]


@contextmanager
def zero_batchnorm_eps(model: nn.Module) -> Iterator[None]:
    """Set every BatchNorm's ``eps`` to 0 for the block (restored after).

    zennit 0.5.1's merge keeps ``eps`` in the identity BatchNorm it leaves behind
    (``(x - 0) / sqrt(1 + eps) * 1 + 0``), so with the default eps its merged model is not the
    original one; with ``eps = 0`` both libraries explain the same function.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    saved = [norm.eps for norm in norms]
    for norm in norms:
        norm.eps = 0.0
    try:
        yield
    finally:
        for norm, eps in zip(norms, saved):
            norm.eps = eps


def graph_nodes(output: torch.Tensor) -> Iterator[object]:
    """Every autograd node behind ``output``, each once (depth first)."""
    stack, seen = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(parent for parent, _ in node.next_functions)
