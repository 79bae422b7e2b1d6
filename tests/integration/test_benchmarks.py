"""Smoke test of ``lrpkit bench``: both suites with ``--quick`` through the CLI's ``main()``.

Tiny models, layers and sizes with one repeat, so this checks that the benchmarks run and write
what they promise (JSON rows with their columns, markdown tables), never how fast anything is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrpkit.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]

MODEL_KEYS = {
    "model", "batch", "size", "input_shape", "device", "method", "library", "composite", "median_ms", "times_ms",
    "ratio_vs_gradient", "zennit_over_lrpkit", "peak_mib", "memory_vs_gradient",
    "memory_lrpkit_over_zennit", "max_rel_diff_vs_zennit", "error", "peak_mib_mapped",
    "memory_vs_gradient_mapped", "memory_lrpkit_over_zennit_mapped", "gflop", "flops_vs_gradient",
    "ratio_vs_gradient_quartiles", "zennit_over_lrpkit_quartiles",
}
RULE_KEYS = {
    "layer", "batch", "rule", "input", "gradient_ms", "rule_ms", "ratio_vs_gradient", "floor_products",
    "ratio_over_floor", "algebraic_min_products", "forward_ratio", "floor_note", "times_ms",
    "gradient_times_ms", "products_counted",
}
COMPOSITES = {"Epsilon", "EpsilonPlus", "EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"}


@pytest.fixture
def checkout(monkeypatch) -> Path:
    """Run as from the root of a checkout: ``benchmarks`` importable, as ``python -m`` makes it."""
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    monkeypatch.chdir(REPO_ROOT)
    return REPO_ROOT


def _load(out: Path, suite: str) -> tuple[dict, str]:
    payload = json.loads((out / f"{suite}.json").read_text())
    markdown = (out / f"{suite}.md").read_text()
    assert payload["suite"] == suite
    assert payload["command"].startswith(f"lrpkit bench {suite} ")
    assert {"cpu", "logical_cores", "torch", "zennit"} <= set(payload["machine"])
    return payload, markdown


def test_bench_rules_quick(checkout, tmp_path, capsys):
    assert main(["bench", "rules", "--quick", "--threads", "2", "--out", str(tmp_path)]) == 0
    payload, markdown = _load(tmp_path, "rules")
    rows = payload["rows"]
    assert rows and all(set(row) == RULE_KEYS for row in rows)
    assert {row["rule"] for row in rows} == {"Epsilon", "ZPlus", "Gamma", "AlphaBeta", "ZBox", "Flat", "WSquare"}
    assert len({row["layer"] for row in rows}) == 5
    assert {(row["rule"], row["input"]) for row in rows if row["input"] == "signed"} == {
        ("ZPlus", "signed"), ("Gamma", "signed"), ("AlphaBeta", "signed")}
    assert all(row["rule_ms"] > 0 and row["gradient_ms"] > 0 and row["floor_products"] >= 1 for row in rows)
    # the products each rule ran, counted from its FLOPs, are exactly its floor on every layer
    assert all(row["products_counted"] == row["floor_products"] for row in rows), [
        (row["layer"], row["rule"], row["input"], row["products_counted"]) for row in rows]
    assert "| layer | rule | input | grad bwd ms | rule bwd ms | x grad | floor (layer products) | counted |" in markdown
    assert "| rule | input | floor (layer products) | counted | algebraic min |" in markdown
    assert "## Floors" in markdown
    assert markdown in capsys.readouterr().out


def test_bench_models_quick(checkout, tmp_path, capsys):
    assert main(["bench", "models", "--quick", "--threads", "2", "--out", str(tmp_path)]) == 0
    payload, markdown = _load(tmp_path, "models")
    rows = payload["rows"]
    assert "peak RSS" in payload["memory_method"] and "'mapped'" in payload["memory_method"]
    assert all(set(row) == MODEL_KEYS for row in rows)
    # Captum's LRP runs where its rules cover every module: tiny-vgg's nn.Flatten has none
    assert all(row["error"] is None for row in rows if row["library"] != "captum"), [row["error"] for row in rows]
    captum = [row for row in rows if row["library"] == "captum"]
    assert len(captum) == 2  # installed with the test dependencies: one row per model
    assert all(row["error"] is None or "Flatten" in row["error"] for row in captum), [row["error"] for row in captum]
    for model in ("tiny-vgg", "tiny-resnet"):
        methods = {row["method"] for row in rows if row["model"] == model}
        assert "gradient x input" in methods
        assert {f"lrpkit {name}" for name in COMPOSITES} <= methods
        assert {f"zennit {name}" for name in COMPOSITES} <= methods
    for row in rows:
        if row["error"] is not None:
            continue
        assert row["median_ms"] > 0 and row["ratio_vs_gradient"] > 0 and row["gflop"] > 0
        # one repeat: its own ratio is every quartile
        assert row["ratio_vs_gradient_quartiles"] == [pytest.approx(row["ratio_vs_gradient"], rel=1e-3)] * 3
        assert row["peak_mib"] is not None and row["peak_mib_mapped"] is not None
        if row["composite"] == "Epsilon" and row["library"] != "captum":
            # exactly one transposed product per layer in lrpkit; zennit: a forward and a transposed one
            assert row["flops_vs_gradient"] == (1.0 if row["library"] == "lrpkit" else 2.0)
        if row["library"] == "lrpkit" and "capture" not in row["composite"]:
            assert row["zennit_over_lrpkit"] > 0 and row["memory_lrpkit_over_zennit"] is not None
            # both libraries did the same work: float32 round-off apart
            assert row["max_rel_diff_vs_zennit"] < 1e-3
    assert ("| method | median ms | x grad | x grad, repeats' IQR | zennit/lrpkit | zennit/lrpkit, repeats' IQR "
            "| GFLOP | FLOP x grad | peak MiB | mem x grad |") in markdown
    assert "| peak MiB, mapped | mapped x grad | mapped lrpkit/zennit |" in markdown
    assert "## lrpkit against the targets of issue 4" in markdown
    assert "## What FunctionalCapture costs (EpsilonPlus)" in markdown
    assert {row["composite"] for row in rows if row["library"] == "lrpkit"} >= {
        "EpsilonPlus, no capture", "EpsilonPlus, capture without op rules"}
    assert markdown in capsys.readouterr().out


def test_paired_ratios_are_taken_repeat_by_repeat():
    from benchmarks.timing import paired_quartiles, quartiles

    assert quartiles([]) is None and quartiles([2.0]) == [2.0, 2.0, 2.0]
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [2.0, 3.0, 4.0]
    # the machine runs 2x slower from the gradient's call of repeat 3 on, but for the method's call
    # of that repeat: four repeats say 1.5, one says 0.75, the ratio of the medians (3 / 4) 0.75
    method, gradient = [3.0, 3.0, 3.0, 6.0, 6.0], [2.0, 2.0, 4.0, 4.0, 4.0]
    assert paired_quartiles(method, gradient) == [1.5, 1.5, 1.5]
    assert paired_quartiles(method, gradient[:4]) is None and paired_quartiles(method, [0.0] * 5) is None


def test_targets_and_capture_tables_show_the_spread_of_the_repeats():
    from benchmarks.report import capture_table, targets_table

    def row(composite: str, library: str, times: list[float], **ratios) -> dict:
        return {"model": "resnet50", "batch": 1, "library": library, "composite": composite,
                "median_ms": sorted(times)[len(times) // 2], "times_ms": times, "flops_vs_gradient": None,
                "ratio_vs_gradient": None, "zennit_over_lrpkit": None, "memory_vs_gradient": None,
                "memory_lrpkit_over_zennit": None, **ratios}

    epsilon = row("Epsilon", "lrpkit", [11.0, 12.0, 13.0], ratio_vs_gradient=1.2,
                  ratio_vs_gradient_quartiles=[1.1, 1.2, 1.25])
    table = targets_table([epsilon])
    assert "| resnet50 | 1 | Epsilon | 1.20 (miss) [1.10-1.25] | <= 1.15 |" in table
    assert "time x grad [repeats' IQR]" in table
    full = row("EpsilonPlus", "lrpkit", [100.0, 110.0, 200.0])
    without = row("EpsilonPlus, no capture", "lrpkit", [96.0, 99.0, 180.0])
    # shares per repeat: 4 %, 10 %, 10 %; of the medians: 1 - 99/110 = 10 %
    assert "| resnet50 | 1 | 99.0 | - | 110.0 | 10.0 % (miss) [7.0 to 10.0 %] | - |" in capture_table([full, without])


def test_bench_own_model_with_weights_and_input_shape(checkout, tmp_path, capsys):
    (tmp_path / "own.py").write_text(
        "from torch import nn\n"
        "def mlp():\n"
        "    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))\n"
    )
    import torch

    torch.manual_seed(3)
    weights = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).state_dict()
    torch.save(weights, tmp_path / "own.pt")
    spec = f"{tmp_path / 'own.py'}:mlp"
    argv = ["bench", "models", "--quick", "--threads", "2", "--models", spec, "--weights", str(tmp_path / "own.pt"),
            "--input-shape", "6", "--out", str(tmp_path)]
    assert main(argv) == 0
    payload, markdown = _load(tmp_path, "models")
    rows = payload["rows"]
    assert {row["model"] for row in rows} == {spec} and all(row["input_shape"] == [6] for row in rows)
    assert all(row["error"] is None for row in rows), [row["error"] for row in rows]
    # the memory children built the same model from the file, with the weights
    assert all(row["peak_mib"] is not None and row["peak_mib_mapped"] is not None for row in rows)
    assert "--input-shape 6 --weights" in payload["command"]
    assert f"## {spec}, batch 1, input 6, cpu" in markdown
    from benchmarks.models import build_model

    built = build_model(spec, weights=str(tmp_path / "own.pt"))
    assert all(torch.equal(built.state_dict()[name], value) for name, value in weights.items())
    assert main(["bench", "models", "--models", spec, "vgg16", "--weights", str(tmp_path / "own.pt")]) == 2
    assert "give exactly one --models NAME" in capsys.readouterr().err


def test_bench_models_narrowed_to_composites_and_libraries(checkout, tmp_path, capsys):
    argv = ["bench", "models", "--quick", "--no-memory", "--threads", "2", "--models", "tiny-resnet", "--batch", "1",
            "--composites", "EpsilonPlusFlat", "Epsilon", "--libraries", "lrpkit", "--out", str(tmp_path)]
    assert main(argv) == 0
    payload, markdown = _load(tmp_path, "models")
    methods = [row["method"] for row in payload["rows"]]
    assert methods == ["gradient x input", "lrpkit EpsilonPlusFlat", "lrpkit Epsilon"]
    assert all(row["error"] is None and row["ratio_vs_gradient"] is not None for row in payload["rows"])
    assert "--composites EpsilonPlusFlat Epsilon --libraries lrpkit" in payload["command"]
    assert "What FunctionalCapture costs" not in markdown  # its variants go with EpsilonPlus
    assert main([*argv[:-2], "--composites", "EpsilonPlus", "--libraries", "zennit", "--out", str(tmp_path)]) == 0
    names = [row["method"] for row in _load(tmp_path, "models")[0]["rows"]]
    assert names == ["gradient x input", "zennit EpsilonPlus"]  # no lrpkit: no capture variants either
    assert main(["bench", "models", "--composites", "EpsilonMagic"]) == 2
    assert "unknown composite 'EpsilonMagic' for --composites; known: Epsilon, EpsilonPlus" in capsys.readouterr().err


def test_bench_outside_a_checkout_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "benchmarks", None)  # import benchmarks fails
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "rules", "--quick"]) == 1
    assert "from the root of a checkout" in capsys.readouterr().err


def test_bench_rejects_bad_numbers(capsys):
    assert main(["bench", "models", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_bench_malloc_tuned_is_recorded(checkout, tmp_path, capsys):
    assert main(["bench", "rules", "--quick", "--threads", "2", "--malloc", "tuned", "--out", str(tmp_path)]) == 0
    payload, markdown = _load(tmp_path, "rules")
    assert payload["options"]["malloc"] == "tuned"  # glibc on this machine: mallopt is there
    assert payload["command"].endswith("--malloc tuned --quick")
    assert "- C allocator: tuned (glibc heap trimming off for every method" in markdown


def _resident_after_free(mapped: bool) -> float:
    """In a child: MiB still resident after allocating and freeing 8 MiB twice (glibc)."""
    from benchmarks.memory import _status_kib
    from benchmarks.timing import map_large_allocations

    if mapped:
        assert map_large_allocations()
    import torch

    before = _status_kib("VmRSS") or 0
    for _ in range(2):  # the first free raises glibc's dynamic threshold, the second block stays
        block = torch.ones(2 * 2**20)
        del block
    return ((_status_kib("VmRSS") or 0) - before) / 1024


def test_mapped_allocations_are_returned_on_free(checkout):
    from benchmarks.memory import run_in_child

    mapped, default = run_in_child(_resident_after_free, True), run_in_child(_resident_after_free, False)
    assert mapped.error is None and default.error is None, (mapped.error, default.error)
    # by default the second 8 MiB block comes from the heap and stays resident; mapped, it goes back
    assert mapped.value < default.value - 6
