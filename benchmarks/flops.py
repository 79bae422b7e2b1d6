"""Exact arithmetic of one explanation: the FLOPs of its matrix products and convolutions.

Timings on a shared machine move by tens of percent between runs; the arithmetic does not. The
count below is what the floors in ``docs/performance.md`` are written in: every forward of a
layer and every transposed product (``aten.convolution_backward`` with only the input gradient
requested, or a matrix product) is counted with the formulas of
:mod:`torch.utils.flop_counter` (``2 * N * in * out`` for a dense layer, likewise per output
element for a convolution). Element-wise work is not counted.

torch's own ``FlopCounterMode`` is not used because it tracks modules with global forward hooks,
and lrpkit takes its shortcut for ``-0.0``-free outputs only when no global hook may replace an
output: under it lrpkit would run a different path than the one being measured.

Counting runs every operation through a :class:`~torch.utils._python_dispatch.TorchDispatchMode`,
which slows it down and makes autograd add the relevances meeting at a branch out of place, so
the count comes from a separate, untimed call. The products themselves do not change under the
mode: lrpkit takes the same single-path forms and recomputes no more layers than without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCounter(TorchDispatchMode):
    """Sum the FLOPs of the matrix products and convolutions run while it is active.

    Attributes
    ----------
    flops
        FLOPs counted so far.
    by_operation
        The same, per ATen operation (``"convolution"``, ``"convolution_backward"``, ``"mm"``, ...).
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.by_operation: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=output))
            self.flops += flops
            name = func._overloadpacket.__name__
            self.by_operation[name] = self.by_operation.get(name, 0) + flops
        return output


def count_flops(call: Callable[[], Any]) -> int:
    """The FLOPs of the matrix products and convolutions ``call()`` runs (forward and backward)."""
    with FlopCounter() as counter:
        call()
    return counter.flops
