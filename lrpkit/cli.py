"""The ``lrpkit`` command line.

Each subcommand is one ``(add_arguments, run)`` pair in :data:`COMMANDS`; adding ``explain``
or ``bench`` later means writing those two functions and one registry entry.

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
