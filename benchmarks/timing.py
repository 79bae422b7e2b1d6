"""Wall-clock timing of one call on the CPU or on CUDA, and small helpers around it."""

from __future__ import annotations

import ctypes

import gc
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def elapsed_ms(call: Callable[[], Any], device: str) -> float:
    """Milliseconds ``call()`` takes, including the work it queues on ``device``.

    On CUDA the time is taken with a pair of ``torch.cuda.Event``s around the call, after a
    synchronisation; on the CPU with :func:`time.perf_counter`. As in :mod:`timeit`, Python's
    cyclic garbage collector is paused during the call, so that a collection triggered by earlier
    work is not charged to whichever call happens to be running; pending collections run after
    the call, untimed.
    """
    gc.disable()
    try:
        return _elapsed_ms(call, device)
    finally:
        gc.enable()


def _elapsed_ms(call: Callable[[], Any], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    begin = time.perf_counter()
    call()
    return (time.perf_counter() - begin) * 1e3


def median(values: Sequence[float]) -> float | None:
    """The median of ``values``, or ``None`` for no values."""
    return float(statistics.median(values)) if values else None


def quartiles(values: Sequence[float]) -> list[float] | None:
    """The first quartile, the median and the third quartile of ``values`` (``None`` for none)."""
    if not values:
        return None
    if len(values) == 1:
        return [float(values[0])] * 3
    low, middle, high = statistics.quantiles(values, n=4, method="inclusive")
    return [float(low), float(middle), float(high)]


def paired_quartiles(numerators: Sequence[float], denominators: Sequence[float]) -> list[float] | None:
    """Quartiles of ``numerators[i] / denominators[i]``, repeat by repeat.

    The suites interleave their repeats (repeat ``i`` of every method, then repeat ``i + 1``), so
    the two times of one repeat were taken under the same load of the machine; the spread of
    their ratios shows how sure a ratio of medians is. ``None`` unless both hold the same,
    non-zero number of positive times.
    """
    if not numerators or len(numerators) != len(denominators) or min(denominators) <= 0:
        return None
    return quartiles([top / bottom for top, bottom in zip(numerators, denominators)])


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """``requires_grad_(False)`` on every parameter of ``model``, restored on exit.

    The plain gradient then builds no graph for parameter gradients; every method is timed on
    the frozen model so that the comparison is the same for all of them.
    """
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def set_threads(threads: int | None) -> int:
    """Apply ``torch.set_num_threads(threads)`` when given; return the number in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Stop glibc from returning freed heap memory to the kernel between calls; ``False`` if not glibc.

    By default glibc trims the top of the heap once more than twice its (dynamic) mmap threshold
    is free there, and the kernel then hands the pages back zeroed -- one page fault per 4 KiB --
    the next time the heap grows. A method that allocates and frees more tensors per call (any
    LRP backward against a plain gradient) pays for that in every call, and how much depends on
    the allocation history, which makes repeated timings jump. Setting both thresholds (32 MiB
    for mmap, the most glibc accepts, and 1 GiB for trimming) keeps freed memory for reuse, as
    ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` or jemalloc/tcmalloc would. It applies to
    the whole process and to every method measured in it.
    """
    return _mallopt((_M_MMAP_THRESHOLD, 32 * 2**20), (_M_TRIM_THRESHOLD, 2**30))


#: The mmap threshold of :func:`map_large_allocations`: glibc's initial one, held fixed.
MAPPED_THRESHOLD = 128 * 1024


def map_large_allocations() -> bool:
    """Give every allocation above 128 KiB its own mapping, returned on free; ``False`` if not glibc.

    glibc starts with this threshold but raises it (up to 32 MiB) whenever a mapped block is
    freed, so later tensors of that size come from the heap, where a freed block below a live one
    stays resident: the peak RSS then depends on the order of allocations (fragmentation) as much
    as on what is alive. Setting the threshold explicitly turns the raising off, so the peak RSS
    follows the memory actually in use. For memory measurements only (each allocation faults its
    pages in afresh, which is slow).
    """
    return _mallopt((_M_MMAP_THRESHOLD, MAPPED_THRESHOLD))


def _mallopt(*settings: tuple[int, int]) -> bool:
    """Apply glibc ``mallopt(parameter, value)`` settings; ``False`` if that is not possible."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(bool(mallopt(parameter, value)) for parameter, value in settings)
