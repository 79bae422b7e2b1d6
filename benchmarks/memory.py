"""Peak memory of one explanation: CUDA allocator statistics, or the peak RSS of a child process.

On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` is exact and
cheap, so it is taken in the benchmark process itself.

On the CPU, the allocator (glibc ``malloc``) keeps freed memory for reuse, so a process that has
already explained one model under-reports the next one; and ``tracemalloc`` does not see
torch's tensor allocations at all. Each configuration is therefore measured in a *fresh* child
process, forked from a ``multiprocessing`` fork server that has imported torch, torchvision,
zennit and lrpkit but never run a model: the child builds the model, resets its peak-RSS mark,
runs one explanation and reports the increase of its peak resident set size over the baseline
after model construction. The peak comes from ``VmHWM`` in ``/proc/self/status`` after a reset
through ``/proc/self/clear_refs`` (Linux >= 4.0) when that is writable, otherwise from
``resource.getrusage(RUSAGE_SELF).ru_maxrss``; :func:`rss_method` says which.
"""

from __future__ import annotations

import multiprocessing
import resource
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

MIB = 1024.0 * 1024.0

#: Modules the fork server imports once, so that each child starts in well under a second.
PRELOAD = [
    "torch",
    "torchvision",
    "zennit.attribution",
    "zennit.composites",
    "zennit.torchvision",
    "lrpkit.attribution",
    "lrpkit.composites",
    "benchmarks.models",
]

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or ``None``."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _can_reset_peak() -> bool:
    """Whether the kernel lets this process reset its peak RSS (``echo 5 > clear_refs``)."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


#: How the second ("mapped") CPU memory column is taken, in words.
MAPPED_METHOD = ("'mapped': the same in a second child whose glibc mmap threshold is fixed at 128 KiB "
                 "(benchmarks.timing.map_large_allocations), so that every tensor is its own mapping "
                 "and is returned on free: the peak RSS then follows the memory in use, not the "
                 "heap's fragmentation")


def rss_method() -> str:
    """How CPU peak memory is measured on this machine, in words (for the reports)."""
    if _can_reset_peak():
        how = ("VmHWM from /proc/self/status, reset via /proc/self/clear_refs after model "
               "construction")
    else:
        how = "resource.getrusage ru_maxrss"
    return (f"peak RSS increase over the baseline after model construction, one fresh child "
            f"process per configuration ({how}); {MAPPED_METHOD}")


class PeakRss:
    """Peak resident set size of this process since :meth:`reset`, in bytes."""

    def __init__(self) -> None:
        self.resettable = _can_reset_peak()
        self.baseline = 0

    def reset(self) -> int:
        """Start a new measurement; returns the baseline (current RSS, or peak so far) in bytes."""
        if self.resettable:
            _CLEAR_REFS.write_text("5")
            self.baseline = (_status_kib("VmRSS") or 0) * 1024
        else:
            self.baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.baseline

    def peak(self) -> int:
        """The peak RSS since :meth:`reset`, in bytes."""
        if self.resettable:
            return (_status_kib("VmHWM") or 0) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def increase_mib(self) -> float:
        """Peak minus baseline, in MiB."""
        return max(0, self.peak() - self.baseline) / MIB


def cuda_peak_mib(call: Callable[[], Any], device: str) -> float:
    """Peak CUDA memory ``call()`` allocates beyond what was allocated before it, in MiB."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    call()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / MIB


@dataclass
class ChildResult:
    """What a child process sends back: a value, or the error that stopped it."""

    value: Any = None
    error: str | None = None


_CONTEXT: Any = None


def _fork_server_context() -> Any:
    """The ``forkserver`` multiprocessing context with :data:`PRELOAD` (created once)."""
    global _CONTEXT
    if _CONTEXT is None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _CONTEXT = context
    return _CONTEXT


def _child_main(connection: Connection, task: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        result = ChildResult(value=task(*args))
    except BaseException as error:  # report everything, the parent decides
        result = ChildResult(error=f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=4)}")
    connection.send(result)
    connection.close()


def run_in_child(task: Callable[..., Any], *args: Any, timeout_s: float = 1800.0) -> ChildResult:
    """Run ``task(*args)`` in a fresh child of the fork server and return what it gives back.

    ``task`` must be importable by name (a module-level function) and its arguments picklable.
    A child that dies (out of memory, a crash) gives ``ChildResult(error=...)``.
    """
    context = _fork_server_context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(sender, task, args), daemon=True)
    process.start()
    sender.close()
    result = ChildResult(error="the child process sent no result")
    try:
        if receiver.poll(timeout_s):
            result = receiver.recv()
        else:
            result = ChildResult(error=f"no result within {timeout_s:.0f} s")
    except EOFError:
        pass
    process.join(timeout=30)
    if process.is_alive():
        process.kill()
        process.join()
    if result.error == "the child process sent no result":
        result = ChildResult(error=f"the child process exited with code {process.exitcode} without a result")
    receiver.close()
    return result
