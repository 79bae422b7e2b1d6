"""Run one suite: measure, print the markdown, write the files."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from . import models, rule_cost
from .options import BenchOptions
from .report import RENDERERS, command_line, machine_info, write_outputs
from .timing import set_threads, tune_malloc

#: Suites by name: ``options -> payload`` (a JSON-ready dict with ``rows``).
SUITES: dict[str, Callable[[BenchOptions], dict[str, Any]]] = {
    "models": models.run,
    "rules": rule_cost.run,
}


def run_suite(options: BenchOptions) -> int:
    """Run ``options.suite``, print its markdown and write ``<suite>.json`` / ``<suite>.md``.

    Returns
    -------
    int
        The exit status: 0, or 2 when CUDA was asked for but is not available.
    """
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        print("lrpkit bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    set_threads(options.threads)
    if options.malloc == "tuned" and not tune_malloc():
        print("lrpkit bench: --malloc tuned needs glibc's mallopt; measuring with the default allocator",
              file=sys.stderr)
        options = options.resolved()
        options.malloc = "default"
    machine = machine_info(options.device)  # before the run: the commit that is measured
    payload = SUITES[options.suite](options)
    payload["machine"] = machine
    payload["command"] = command_line(payload["options"])
    markdown = RENDERERS[options.suite](payload)
    print(markdown)
    for path in write_outputs(options.out, payload, markdown):
        print(f"wrote {path}", file=sys.stderr)
    return 0
