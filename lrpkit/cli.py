"""The ``lrpkit`` command line.

Each subcommand is one ``(add_arguments, run)`` pair in :data:`COMMANDS`; adding one means
writing those two functions and one registry entry. ``bench`` runs the ``benchmarks`` package
of a repository checkout (it is not installed with lrpkit).

Examples
--------
>>> main(["demo", "--out", "demo.png", "--samples", "4"])   # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, how it adds its options, and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------------------- demo


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="PATH", default=None,
                        help="where to write the PNG (default: ./lrpkit-demo.png)")
    parser.add_argument("--samples", metavar="N", type=int, default=12,
                        help="number of test digits to explain (default: 12)")
    parser.add_argument("--cache-dir", metavar="DIR", default=None,
                        help="where the digits CNN's weights are cached (default: "
                             "$LRPKIT_CACHE, $XDG_CACHE_HOME/lrpkit or ~/.cache/lrpkit)")


def _demo_run(args: argparse.Namespace) -> int:
    from lrpkit.demo import run_demo  # imported late: `lrpkit --help` stays fast

    if args.samples < 1:
        print("lrpkit demo: --samples must be at least 1", file=sys.stderr)
        return 2
    run_demo(out_path=args.out, n_samples=args.samples, cache_dir=args.cache_dir)
    return 0


# --------------------------------------------------------------------------- describe


def _describe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="'digits-cnn' (the demo's trained CNN, explained on a test digit) or a "
                             "torchvision model name such as resnet18 (weights=None, explained on a "
                             "random image unless --weights is given)")
    parser.add_argument("--composite", default="epsilon_plus_flat",
                        help="preset name (default: epsilon_plus_flat)")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="a state_dict file to load into the torchvision model")
    parser.add_argument("--size", metavar="PIXELS", type=int, default=64,
                        help="input height and width for torchvision models (default: 64)")
    parser.add_argument("--target", metavar="CLASS", type=int, default=None,
                        help="class to explain (default: the predicted class)")


def _describe_run(args: argparse.Namespace) -> int:
    import torch

    import lrpkit
    from lrpkit.composites import names

    if args.composite not in names():
        print(f"lrpkit describe: unknown composite {args.composite!r}; known: {', '.join(names())}",
              file=sys.stderr)
        return 2
    if args.model == "digits-cnn":
        from lrpkit.digits import load_digits_tensors, pretrained_cnn

        model: torch.nn.Module = pretrained_cnn()
        x = load_digits_tensors()[2][:1]
    else:
        import torchvision

        factory = getattr(torchvision.models, args.model, None)
        if not callable(factory) or args.model.startswith("_"):
            print(f"lrpkit describe: torchvision has no model {args.model!r}", file=sys.stderr)
            return 2
        extra = {"image_size": args.size} if args.model.startswith("vit_") else {}
        model = factory(weights=None, **extra)
        if args.weights is not None:
            model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        x = torch.rand(1, 3, args.size, args.size)
    print(lrpkit.describe(model.eval(), x, composite=args.composite, target=args.target))
    return 0


# ------------------------------------------------------------------------------ bench


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=["models", "rules"],
                        help="'models': whole torchvision models against gradient x input and "
                             "zennit; 'rules': each rule's backward on single layers")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where to run (default: cpu)")
    parser.add_argument("--models", nargs="+", metavar="NAME", default=None,
                        help="models suite: torchvision model names or tiny-vgg / tiny-resnet "
                             "(default: vgg16 resnet50; with --quick: tiny-vgg tiny-resnet)")
    parser.add_argument("--batch", nargs="+", type=int, metavar="N", default=None,
                        help="batch sizes (default: models 1 8 on the CPU, 1 8 32 on CUDA; rules 8; "
                             "with --quick: 1 and 2)")
    parser.add_argument("--repeats", type=int, metavar="N", default=None,
                        help="timed repeats; the median is reported (default: models 5, rules 10; "
                             "with --quick: 1)")
    parser.add_argument("--warmup", type=int, metavar="N", default=None,
                        help="untimed calls first, at least 1 (default: models 1, rules 2)")
    parser.add_argument("--size", type=int, metavar="PIXELS", default=None,
                        help="models suite: input height and width (default: 224; with --quick: 32)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write <suite>.json and <suite>.md (default: benchmarks/results/ "
                             "in the checkout)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny models, layers and sizes, one repeat: a smoke test, not a measurement")
    parser.add_argument("--no-memory", action="store_true",
                        help="models suite: skip the peak-memory measurement")
    parser.add_argument("--threads", type=int, metavar="N", default=None,
                        help="torch.set_num_threads for the run (default: torch's default)")
    parser.add_argument("--malloc", choices=("default", "tuned"), default="default",
                        help="tuned: keep freed memory in glibc's heap (no trimming) for every method, "
                             "so that page faults do not dominate the timings (default: default)")


def _import_benchmarks() -> Any:
    """The repository's ``benchmarks`` package, or ``None`` when this is not run from a checkout.

    ``lrpkit`` is installed without it; from the root of a checkout it is importable (``python -m``
    puts the working directory on ``sys.path``; the ``lrpkit`` script does not, so it is added).
    """
    import importlib

    def ours(module: Any) -> bool:
        return module is not None and hasattr(module, "run_suite") and hasattr(module, "BenchOptions")

    try:
        module = importlib.import_module("benchmarks")
    except ImportError:
        module = None
    if ours(module):
        return module
    checkout = Path.cwd()
    if not (checkout / "benchmarks" / "__init__.py").is_file():
        return None
    sys.path.insert(0, str(checkout))
    sys.modules.pop("benchmarks", None)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module("benchmarks")
    except ImportError:
        return None
    return module if ours(module) else None


def _bench_run(args: argparse.Namespace) -> int:
    for name in ("repeats", "warmup", "size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"lrpkit bench: --{name} must be at least 1", file=sys.stderr)
            return 2
    if args.batch is not None and min(args.batch) < 1:
        print("lrpkit bench: --batch sizes must be at least 1", file=sys.stderr)
        return 2
    benchmarks = _import_benchmarks()
    if benchmarks is None:
        print("lrpkit bench: the benchmarks live in the lrpkit repository, not in the installed "
              "package. Run `lrpkit bench ...` (or `python -m benchmarks ...`) from the root of a "
              "checkout of lrpkit, the directory that contains benchmarks/.", file=sys.stderr)
        return 1
    return int(benchmarks.run_suite(benchmarks.BenchOptions.from_namespace(args)))


COMMANDS: dict[str, Command] = {
    "demo": Command(
        help="explain 8x8 digits with three LRP composites and the gradient, write a PNG",
        add_arguments=_demo_arguments,
        run=_demo_run,
    ),
    "describe": Command(
        help="print every module and captured call of a model with its rule and relevance",
        add_arguments=_describe_arguments,
        run=_describe_run,
    ),
    "bench": Command(
        help="time and measure lrpkit against gradient x input and zennit (run from a checkout)",
        add_arguments=_bench_arguments,
        run=_bench_run,
    ),
}
"""Subcommands by name, in the order ``--help`` lists them."""


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lrpkit")
    except Exception:  # not installed (run from a checkout)
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="lrpkit",
        description="Layer-wise Relevance Propagation for PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"lrpkit {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lrpkit`` command line.

    Parameters
    ----------
    argv
        Arguments without the program name; default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 on success, 2 for a usage error, 1 for a missing optional
        dependency.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return COMMANDS[args.command].run(args)
    except ImportError as error:
        if "pip install" not in str(error):  # a bug, not a missing optional dependency
            raise
        print(f"lrpkit {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
