"""Machine description, markdown tables and the JSON/markdown files of a benchmark run."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .models import CAPTURE_NO_RULES, CAPTURE_SHARE_TARGET, CAPTURE_VARIANTS, MEMORY_TARGETS, NO_CAPTURE, TIME_TARGETS
from .timing import paired_quartiles

#: Columns of the whole-model table: (header, row key, format).
MODEL_COLUMNS = [
    ("method", "method", "s"),
    ("median ms", "median_ms", ".1f"),
    ("x grad", "ratio_vs_gradient", ".2f"),
    ("x grad, repeats' IQR", "ratio_vs_gradient_quartiles", "iqr"),
    ("zennit/lrpkit", "zennit_over_lrpkit", ".2f"),
    ("zennit/lrpkit, repeats' IQR", "zennit_over_lrpkit_quartiles", "iqr"),
    ("GFLOP", "gflop", ".3g"),
    ("FLOP x grad", "flops_vs_gradient", ".2f"),
    ("peak MiB", "peak_mib", ".0f"),
    ("mem x grad", "memory_vs_gradient", ".2f"),
    ("mem lrpkit/zennit", "memory_lrpkit_over_zennit", ".2f"),
    ("peak MiB, mapped", "peak_mib_mapped", ".0f"),
    ("mapped x grad", "memory_vs_gradient_mapped", ".2f"),
    ("mapped lrpkit/zennit", "memory_lrpkit_over_zennit_mapped", ".2f"),
    ("rel. diff vs zennit", "max_rel_diff_vs_zennit", ".1e"),
]

#: Columns of the rule-cost table: (header, row key, format).
RULE_COLUMNS = [
    ("layer", "layer", "s"),
    ("rule", "rule", "s"),
    ("input", "input", "s"),
    ("grad bwd ms", "gradient_ms", ".3f"),
    ("rule bwd ms", "rule_ms", ".3f"),
    ("x grad", "ratio_vs_gradient", ".2f"),
    ("floor (layer products)", "floor_products", "d"),
    ("counted", "products_counted", ".2f"),
    ("x grad / floor", "ratio_over_floor", ".2f"),
    ("algebraic min", "algebraic_min_products", "s"),
    ("fwd x plain", "forward_ratio", ".2f"),
]


# ----------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_features() -> list[str]:
    """The vector extensions that matter for torch's CPU kernels (AVX2, AVX-512, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return [flag for flag in wanted if flag in flags]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        # the suites' own output files do not count as changes to the code being measured
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}{' (with uncommitted changes)' if dirty else ''}"


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, GPU, library versions, commit."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_features": _cpu_features(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "zennit": _version("zennit"),
        "captum": _version("captum"),
        "lrpkit_commit": _git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def command_line(options: dict[str, Any]) -> str:
    """The ``lrpkit bench`` command that repeats the run (every option spelled out)."""
    words = ["lrpkit", "bench", options["suite"], "--device", options["device"]]
    if options["suite"] == "models":
        words += ["--models", *options["models"], "--size", str(options["size"])]
        if options.get("input_shape") is not None:
            words += ["--input-shape", *map(str, options["input_shape"])]
        if options.get("weights") is not None:
            words += ["--weights", options["weights"]]
        for name in ("composites", "libraries"):
            if options.get(name) is not None:
                words += [f"--{name}", *options[name]]
    words += ["--batch", *map(str, options["batches"]), "--repeats", str(options["repeats"]),
              "--warmup", str(options["warmup"])]
    if options["threads"] is not None:
        words += ["--threads", str(options["threads"])]
    if options.get("malloc", "default") != "default":
        words += ["--malloc", options["malloc"]]
    if options["suite"] == "models" and not options["memory"]:
        words.append("--no-memory")
    if options["quick"]:
        words.append("--quick")
    return shlex.join(words)


# ---------------------------------------------------------------------------------- markdown


def format_value(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; ``-`` for a missing value.

    ``spec="iqr"``: quartiles ``[q1, median, q3]`` shown as the range ``q1-q3``.
    """
    if value is None:
        return "-"
    if spec == "s":
        return str(value)
    if spec == "iqr":
        return f"{value[0]:.2f}-{value[2]:.2f}"
    return format(value, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def _header(title: str, payload: dict[str, Any]) -> list[str]:
    machine = payload["machine"]
    gpu = f", GPU {machine['gpu']} (CUDA {machine['cuda']})" if "gpu" in machine else ""
    lines = [
        f"# {title}",
        "",
        f"- machine: {machine['cpu']} ({', '.join(machine['cpu_features']) or 'no AVX2'}), "
        f"{machine['logical_cores']} logical cores, torch threads {machine['torch_threads']}{gpu}",
        f"- software: python {machine['python']}, torch {machine['torch']}, torchvision "
        f"{machine['torchvision']}, zennit {machine['zennit']}, captum {machine['captum']}, "
        f"lrpkit commit {machine['lrpkit_commit']}",
        f"- date (UTC): {machine['date_utc']}",
        f"- command: `{payload['command']}`",
        f"- C allocator: {payload['options'].get('malloc', 'default')}"
        + (" (glibc heap trimming off for every method, see `--malloc`)" if payload["options"].get("malloc") == "tuned" else ""),
    ]
    if "memory_method" in payload:
        lines.append(f"- memory: {payload['memory_method']}")
    lines += [f"- {note}" for note in payload["notes"]]
    return lines


def _check(value: float | None, limit: float | None, at_most: bool, spread: list[float] | None = None) -> str:
    """``value`` against ``limit``, with the repeats' interquartile range ``spread`` when known.

    The verdict is the ratio of medians'; ``spread`` shows whether the repeat-by-repeat ratios
    fall on one side of the limit (a settled verdict) or straddle it.
    """
    if value is None:
        return "-"
    text = f"{value:.2f}"
    if limit is not None:
        met = value <= limit if at_most else value >= limit
        text += f" ({'ok' if met else 'miss'})"
    if spread is not None and spread[0] != spread[2]:
        text += f" [{format_value(spread, 'iqr')}]"
    return text


def targets_table(rows: Sequence[dict[str, Any]]) -> str:
    """lrpkit against issue 4's targets, one line per (model, batch, composite)."""
    memory_vs_gradient, memory_vs_zennit = MEMORY_TARGETS
    lines = []
    for row in rows:
        if row["library"] != "lrpkit" or row["composite"] in CAPTURE_VARIANTS:
            continue
        time_limit, speedup = TIME_TARGETS.get(row["composite"], (None, None))
        lines.append([
            row["model"], str(row["batch"]), row["composite"],
            _check(row["ratio_vs_gradient"], time_limit, at_most=True, spread=row.get("ratio_vs_gradient_quartiles")),
            "-" if time_limit is None else f"<= {time_limit}",
            format_value(row.get("flops_vs_gradient"), ".2f"),
            _check(row["zennit_over_lrpkit"], speedup, at_most=False, spread=row.get("zennit_over_lrpkit_quartiles")),
            "-" if speedup is None else f">= {speedup}",
            _check(row["memory_vs_gradient"], memory_vs_gradient, at_most=True),
            _check(row["memory_lrpkit_over_zennit"], memory_vs_zennit, at_most=True),
            _check(row.get("memory_vs_gradient_mapped"), memory_vs_gradient, at_most=True),
            _check(row.get("memory_lrpkit_over_zennit_mapped"), memory_vs_zennit, at_most=True),
        ])
    headers = ["model", "batch", "composite", "time x grad [repeats' IQR]", "target", "FLOP x grad",
               "zennit/lrpkit [repeats' IQR]", "target",
               f"mem x grad (<= {memory_vs_gradient})", f"mem lrpkit/zennit (<= {memory_vs_zennit})",
               "mapped x grad", "mapped lrpkit/zennit"]
    return markdown_table(headers, lines)


def models_markdown(payload: dict[str, Any]) -> str:
    """The whole-model suite as markdown: one table per (model, batch), then the targets."""
    lines = _header("lrpkit benchmarks: whole models", payload)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in payload["rows"]:
        groups.setdefault((row["model"], row["batch"]), []).append(row)
    for (model, batch), rows in groups.items():
        shape, device = rows[0]["input_shape"], rows[0]["device"]
        label = f"{shape[1]}x{shape[2]}" if len(shape) == 3 and shape[0] == 3 else "input " + "x".join(map(str, shape))
        lines += ["", f"## {model}, batch {batch}, {label}, {device}", ""]
        table = [[format_value(row.get(key), spec) for _, key, spec in MODEL_COLUMNS] for row in rows]
        lines.append(markdown_table([header for header, _, _ in MODEL_COLUMNS], table))
        errors = [f"- {row['method']}: {row['error']}" for row in rows if row["error"]]
        if errors:
            lines += ["", "Errors:", *errors]
    lines += ["", "## lrpkit against the targets of issue 4", "", targets_table(payload["rows"])]
    capture = capture_table(payload["rows"])
    if capture:
        lines += ["", "## What FunctionalCapture costs (EpsilonPlus)", "", capture]
    return "\n".join(lines) + "\n"


def capture_table(rows: Sequence[dict[str, Any]]) -> str:
    """FunctionalCapture's share of EpsilonPlus's time, per (model, batch); ``""`` without the variants.

    The share is taken from the medians, with the interquartile range of the shares repeat by
    repeat (:func:`benchmarks.timing.paired_quartiles`) beside it.
    """
    found: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["library"] == "lrpkit" and row["median_ms"] is not None:
            found.setdefault((row["model"], row["batch"]), {})[row["composite"]] = row
    lines = []
    for (model, batch), by_name in found.items():
        full, without, bare = (by_name.get(name) for name in ("EpsilonPlus", NO_CAPTURE, CAPTURE_NO_RULES))
        if full is None or without is None:
            continue
        share = 1 - without["median_ms"] / full["median_ms"]
        kept = paired_quartiles(without["times_ms"], full["times_ms"])  # no-capture time / full time
        spread = None if kept is None else [1 - kept[2], 1 - kept[1], 1 - kept[0]]
        interception = None if bare is None else 1 - without["median_ms"] / bare["median_ms"]
        lines.append([
            model, str(batch), format_value(without["median_ms"], ".1f"),
            format_value(None if bare is None else bare["median_ms"], ".1f"), format_value(full["median_ms"], ".1f"),
            f"{share * 100:.1f} % ({'ok' if share <= CAPTURE_SHARE_TARGET else 'miss'})"
            + ("" if spread is None or spread[0] == spread[2] else f" [{spread[0] * 100:.1f} to {spread[2] * 100:.1f} %]"),
            "-" if interception is None else f"{interception * 100:.1f} %",
        ])
    headers = ["model", "batch", "no capture ms", "capture, no op rules ms", "capture + rules ms",
               f"share of the total (<= {CAPTURE_SHARE_TARGET * 100:.0f} %) [repeats' IQR]", "interception alone"]
    return markdown_table(headers, lines) if lines else ""


def rules_pivot(rows: Sequence[dict[str, Any]]) -> str:
    """Rule backward / plain gradient backward: rules (and inputs) by layers, with the floor."""
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    keys = list(dict.fromkeys((row["rule"], row["input"]) for row in rows))
    cells = {(row["rule"], row["input"], row["layer"]): row for row in rows}
    table = []
    for rule, kind in keys:
        first = cells[(rule, kind, layers[0])]
        counted = dict.fromkeys(format_value(cells[(rule, kind, layer)].get("products_counted"), ".2f")
                                for layer in layers if (rule, kind, layer) in cells)
        line = [rule, kind, str(first["floor_products"]), " / ".join(counted), first["algebraic_min_products"]]
        line += [format_value(cells.get((rule, kind, layer), {}).get("ratio_vs_gradient"), ".2f") for layer in layers]
        table.append(line)
    return markdown_table(["rule", "input", "floor (layer products)", "counted", "algebraic min", *layers], table)


def rules_markdown(payload: dict[str, Any]) -> str:
    """The rule-cost suite as markdown: a summary by rule and layer, the full table, the floors."""
    lines = _header("lrpkit benchmarks: cost of each rule per layer", payload)
    batches = list(dict.fromkeys(row["batch"] for row in payload["rows"]))
    for batch in batches:
        rows = [row for row in payload["rows"] if row["batch"] == batch]
        lines += ["", f"## batch {batch}: rule backward / plain gradient backward", "", rules_pivot(rows)]
        lines += ["", f"## batch {batch}: all measurements", ""]
        table = [[format_value(row[key], spec) for _, key, spec in RULE_COLUMNS] for row in rows]
        lines.append(markdown_table([header for header, _, _ in RULE_COLUMNS], table))
    notes = dict.fromkeys(f"- {row['rule']} ({row['input']}): {row['floor_note']}" for row in payload["rows"])
    lines += ["", "## Floors", "", *notes]
    return "\n".join(lines) + "\n"


RENDERERS = {"models": models_markdown, "rules": rules_markdown}


def write_outputs(out: Path, payload: dict[str, Any], markdown: str) -> list[Path]:
    """Write ``<suite>.json`` and ``<suite>.md`` to ``out`` (created if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{payload['suite']}.json"
    markdown_path = out / f"{payload['suite']}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    markdown_path.write_text(markdown)
    return [json_path, markdown_path]
