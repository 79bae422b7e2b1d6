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
import json
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


# -------------------------------------------------------------------- explain, describe

_MODEL_HELP = (
    "'digits-cnn' (the demo's trained CNN, on a test digit), a torchvision model name such as "
    "resnet18 (weights=None unless --weights is given), or your own model as path/to/file.py:factory "
    "or package.module:factory (a function or class that returns the nn.Module, called with the "
    "keyword arguments of --model-args, none by default); without --input it is explained on a "
    "random image"
)


class _UsageError(Exception):
    """A bad command line: printed as ``lrpkit <command>: <message>``, exit status 2."""


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and the options that say how to build it and what to feed it (explain, describe)."""
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument("--composite", default="epsilon_plus_flat",
                        help="preset name (default: epsilon_plus_flat)")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="a state_dict file (torch.save) to load into the model")
    parser.add_argument("--input", metavar="PATH", action="append", default=None,
                        help="what to explain: an image (PNG, JPEG, ...; RGB in [0, 1], batch of one), "
                             "a tensor saved with torch.save (.pt) or a NumPy array (.npy), with its "
                             "batch dimension; repeated for a model with several inputs, model(*inputs) "
                             "(default: a random image)")
    parser.add_argument("--input-shape", metavar="DIM", type=int, nargs="+", default=None,
                        help="shape of the random input after the batch dimension, e.g. 3 32 32 "
                             "(default: 3 SIZE SIZE)")
    parser.add_argument("--size", metavar="PIXELS", type=int, default=None,
                        help="height and width of the random image (default: 64), or of an --input "
                             "image after resizing (default: as it is)")
    parser.add_argument("--target", metavar="CLASS", type=int, default=None,
                        help="class to explain (default: the predicted class; on an (N, C, H, W) output "
                             "such as a segmentation map, the class's whole map)")
    parser.add_argument("--mean", metavar="M", type=float, nargs="+", default=None,
                        help="normalise the input per channel (dim 1) as (x - mean) / std before the "
                             "model sees it, e.g. for torchvision's ImageNet weights; with --std")
    parser.add_argument("--std", metavar="S", type=float, nargs="+", default=None,
                        help="the standard deviations for --mean")
    parser.add_argument("--imagenet", action="store_true",
                        help="--mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 (ImageNet's statistics)")
    parser.add_argument("--output", metavar="KEY", default=None,
                        help="for a model that returns a dict or tuple: the key or index of the output "
                             "to explain (torchvision's segmentation models: out)")
    parser.add_argument("--model-args", metavar="JSON", default=None,
                        help="keyword arguments for your factory or the torchvision builder, as a JSON "
                             "object, e.g. '{\"num_classes\": 10}'")


def _selector(key: str | None) -> str | int | None:
    """``--output``: an index when it is a whole number, else a key."""
    return int(key) if key is not None and key.lstrip("-").isdigit() else key


IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _normalization(args: argparse.Namespace) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` from ``--mean``/``--std`` or ``--imagenet``; ``None`` without them."""
    if args.imagenet:
        if args.mean is not None or args.std is not None:
            raise _UsageError("give --imagenet or --mean/--std, not both")
        return IMAGENET_MEAN, IMAGENET_STD
    if (args.mean is None) != (args.std is None):
        raise _UsageError("give --mean and --std together")
    if args.mean is None:
        return None
    if len(args.mean) != len(args.std):
        raise _UsageError(f"--mean has {len(args.mean)} values and --std {len(args.std)}; give one of each per channel")
    if min(args.std) <= 0:
        raise _UsageError("--std must be positive")
    return args.mean, args.std


def _normalized(x: Any, normalization: tuple[list[float], list[float]]) -> Any:
    """``(x - mean) / std`` per channel (dim 1)."""
    mean, std = normalization
    if not x.is_floating_point():
        raise _UsageError(f"--mean/--std normalise values, and the input holds {x.dtype} (token ids?)")
    if x.dim() < 2 or x.shape[1] != len(mean):
        channels = x.shape[1] if x.dim() > 1 else "no"
        raise _UsageError(
            f"--mean and --std have {len(mean)} values, one per channel, and the input, shaped {tuple(x.shape)}, "
            f"has {channels} channels (dim 1)"
        )
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - x.new_tensor(mean).view(shape)) / x.new_tensor(std).view(shape)


def _model_and_input(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The model (eval mode), the input batch it sees and that input as given (before ``--mean``/``--std``).

    Raises :class:`_UsageError` if the command line does not name them.
    """
    import torch

    from lrpkit.composites import names

    if args.composite not in names():
        raise _UsageError(f"unknown composite {args.composite!r}; known: {', '.join(names())}")
    if (args.size is not None and args.size < 1) or (args.input_shape is not None and min(args.input_shape) < 1):
        raise _UsageError("--size and --input-shape must be at least 1")
    if args.input is not None and args.input_shape is not None:
        raise _UsageError("give --input or --input-shape, not both")
    with torch.random.fork_rng(devices=[]):  # the same random weights and input on every run
        torch.manual_seed(0)
        model, x = _build_model(args)
        if x is None and args.input is None:
            shape = args.input_shape or [3, args.size or 64, args.size or 64]
            x = torch.rand(1, *shape)
    if args.weights is not None:
        _load_weights(model, args.weights)
    if args.input is not None:
        parts = tuple(_load_input(args, path) for path in args.input)
        x = parts[0] if len(parts) == 1 else parts
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    x = _with_dtype(x, dtype)
    normalization = _normalization(args)
    if normalization is not None and isinstance(x, tuple):
        raise _UsageError("--mean/--std normalise one input; with several, save them normalised")
    return model.eval(), x if normalization is None else _normalized(x, normalization), x


def _with_dtype(x: Any, dtype: Any) -> Any:
    """The floating-point inputs in the model's dtype (token ids as they are)."""
    if isinstance(x, tuple):
        return tuple(_with_dtype(part, dtype) for part in x)
    return x.to(dtype) if dtype is not None and x.is_floating_point() else x


def _build_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """The model MODEL names, and the input that comes with it (``None`` but for digits-cnn)."""
    from lrpkit.loading import is_model_spec, model_from_spec

    kwargs = _model_kwargs(args)
    if args.model == "digits-cnn":
        if args.weights is not None or kwargs:
            raise _UsageError("digits-cnn comes with its weights; --weights and --model-args are for torchvision "
                              "models and your own")
        from lrpkit.digits import load_digits_tensors, pretrained_cnn

        return pretrained_cnn(), load_digits_tensors()[2][:1]
    if is_model_spec(args.model):
        try:
            return model_from_spec(args.model, kwargs), None
        except (ValueError, AttributeError, FileNotFoundError, ModuleNotFoundError) as error:
            raise _UsageError(str(error)) from error
    import inspect

    import torchvision

    factory: Any = torchvision.models
    for part in args.model.split("."):  # segmentation.fcn_resnet50, video.r3d_18
        factory = None if part.startswith("_") else getattr(factory, part, None)
    if not callable(factory) or isinstance(factory, type):
        raise _UsageError(
            f"torchvision has no model {args.model!r} (segmentation and video models: segmentation.NAME, "
            "video.NAME); for your own model write path/to/file.py:factory"
        )
    extra: dict[str, Any] = {"image_size": args.size or 64} if args.model.startswith("vit_") else {}
    if "weights_backbone" in inspect.signature(factory).parameters:
        extra["weights_backbone"] = None  # never downloaded
    if {"weights", "weights_backbone"} & set(kwargs):
        raise _UsageError("--model-args: torchvision's weights are never downloaded; load your own with --weights")
    try:
        return factory(weights=None, **{**extra, **kwargs}), None
    except (TypeError, ValueError) as error:
        if not kwargs:
            raise
        raise _UsageError(f"torchvision's {args.model} with --model-args {args.model_args}: {error}") from error


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--model-args``: the factory's keyword arguments (empty without it)."""
    if args.model_args is None:
        return {}
    try:
        kwargs = json.loads(args.model_args)
    except json.JSONDecodeError as error:
        raise _UsageError(f"--model-args is not JSON ({error}); write an object, e.g. '{{\"num_classes\": 10}}'") from error
    if not isinstance(kwargs, dict):
        raise _UsageError(f"--model-args must be a JSON object of keyword arguments, not a {type(kwargs).__name__}")
    return kwargs


def _load_weights(model: Any, path: str) -> None:
    from lrpkit.loading import load_weights

    try:
        load_weights(model, path)
    except (ValueError, FileNotFoundError) as error:
        raise _UsageError(str(error)) from error


def _load_input(args: argparse.Namespace, path: str) -> Any:
    from lrpkit.loading import load_input

    try:
        return load_input(path, None if args.size is None else (args.size, args.size))
    except (ValueError, FileNotFoundError) as error:
        raise _UsageError(str(error)) from error


def _explain_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--out", metavar="PATH", default="lrpkit-explanation.png",
                        help="where to write the heatmaps: a PNG for inputs shaped (N, C, H, W) (input and "
                             "heatmap side by side), (N, C, T, H, W) (frames over their heatmaps), (N, L) "
                             "(a strip per sample) or (N, A, B) (a map per sample); for (N, L) inputs such "
                             "as token ids also an HTML page (.html), the tokens coloured by relevance; "
                             "with several inputs one file each, PATH-input0.png, ... (default: "
                             "./lrpkit-explanation.png)")
    parser.add_argument("--vocab", metavar="PATH", default=None,
                        help="for token ids: a vocabulary file with one token per line, line n naming id n "
                             "(BERT's vocab.txt), to name the tokens in the printout and the HTML page")
    parser.add_argument("--save", metavar="PATH", default=None,
                        help="also save the output and relevance tensors (torch.save) here")


def _explain_run(args: argparse.Namespace) -> int:
    import torch

    import lrpkit

    model, x, given = _model_and_input(args)
    inputs, shown = (x, given) if isinstance(x, tuple) else ((x,), (given,))
    vocabulary = _vocabulary(args.vocab, inputs)
    html = args.out.lower().endswith(".html")
    for part in inputs:
        if html and part.dim() != 2:
            raise _UsageError(f"an HTML page colours a sequence, an input shaped (N, L); this one is shaped "
                              f"{tuple(part.shape)}: write a .png")
    result = lrpkit.explain(model, x, composite=args.composite, target=args.target, output=_selector(args.output))
    relevances = result.relevance if isinstance(x, tuple) else (result.relevance,)
    print(_summary(result.output, relevances, result.start))
    for index, (part, relevance) in enumerate(zip(inputs, relevances)):
        if part.dim() == 2:
            print(_largest(part, relevance, vocabulary, "" if len(inputs) == 1 else f"input {index}, "))
    if args.save is not None:
        saved = {"input": x, "output": result.output, "relevance": result.relevance, "start": result.start}
        torch.save(saved if given is x else {**saved, "given": given}, args.save)
        print(f"saved input, output and relevance to {args.save}")
    for index, (seen, part, relevance) in enumerate(zip(shown, inputs, relevances)):
        out = args.out if len(inputs) == 1 else _numbered(args.out, index)
        print(_write_explanation(seen, part, relevance, vocabulary, out))
    return 0


def _numbered(out: str, index: int) -> str:
    """``heatmap-input0.png`` for input 0 of several, from ``heatmap.png``."""
    path = Path(out)
    return str(path.with_name(f"{path.stem}-input{index}{path.suffix}"))


def _write_explanation(given: Any, x: Any, relevance: Any, vocabulary: list[str] | None, out: str) -> str:
    """Write the heatmaps that suit the input's shape to ``out``; what was written."""
    if out.lower().endswith(".html"):
        return f"wrote {_write_text_page(x, relevance, vocabulary, out)}"
    if x.dim() == 4:
        return f"wrote {_write_heatmaps(given, relevance, out)}"
    if x.dim() == 5:
        return f"wrote {_write_frames(given, relevance, out)}"
    if x.dim() in (2, 3):
        return f"wrote {_write_maps(relevance, out)}"
    return (f"no heatmap: the input is shaped {tuple(x.shape)}, not (N, L), (N, A, B), (N, C, H, W) or "
            "(N, C, T, H, W); --save keeps the relevance")


def _summary(output: Any, relevances: Sequence[Any], start: Any) -> str:
    """One line per sample (the first eight): the explained class, its logit and the relevance's sum (over all inputs)."""
    shapes = ", ".join(str(tuple(relevance.shape)) for relevance in relevances)
    lines = [f"output {tuple(output.shape)}, relevance {shapes}"]
    for index in range(min(len(output), 8)):
        per_class = start[index].reshape(start.shape[1], -1) if start.dim() > 1 else start[index].reshape(1, 1)
        target = int(per_class.abs().sum(dim=1).argmax())
        total = sum(float(relevance[index].sum()) for relevance in relevances)
        logit = float(per_class[target].sum())  # a segmentation map: the sum of the class's logits
        what = "logit" if per_class.shape[1] == 1 else "sum of its logits"
        share = f" = {total / logit:.4f} x the {what}" if logit != 0 else ""
        lines.append(f"sample {index}: class {target}, {what} {logit:.6g}; relevance sums to {total:.6g}{share}")
    return "\n".join(lines)


def _write_heatmaps(x: Any, relevance: Any, out: str) -> Any:
    """Input and heatmap of each sample (the first eight) side by side, as one PNG."""
    from lrpkit import image

    count = min(len(x), 8)
    cells = [[_shown_input(x[index]), image.heatmap(relevance[index])] for index in range(count)]
    scale = max(1, 256 // max(x.shape[-2:]))
    return image.save_png(image.grid(cells, col_labels=["input", "relevance"], scale=scale), out)


def _write_frames(x: Any, relevance: Any, out: str) -> Any:
    """Video clips ``(N, C, T, H, W)``: for each sample (the first four) its frames (at most eight,
    evenly spaced) over their heatmaps, one colour scale per clip, as one PNG."""
    import torch

    from lrpkit import image

    frames = torch.linspace(0, x.shape[2] - 1, min(x.shape[2], 8)).round().long().unique().tolist()
    rows, labels = [], []
    for index in range(min(len(x), 4)):
        bound = float(relevance[index].abs().max()) or None
        rows.append([_shown_input(x[index][:, frame]) for frame in frames])
        rows.append([image.heatmap(relevance[index][:, frame], bound=bound) for frame in frames])
        labels += [f"sample {index}", "relevance"]
    scale = max(1, 128 // max(x.shape[-2:]))
    columns = [f"frame {frame}" for frame in frames]
    return image.save_png(image.grid(rows, row_labels=labels, col_labels=columns, scale=scale), out)


def _write_maps(relevance: Any, out: str) -> Any:
    """The relevance of each sample (the first eight) as one PNG: a strip over the positions of an
    (L,) sample, a map of an (A, B) sample (rows A, columns B)."""
    from lrpkit import image

    count = min(len(relevance), 8)
    cells = [[image.heatmap(_viewable(relevance[index]))] for index in range(count)]
    labels = [f"sample {index}" for index in range(count)]
    return image.save_png(image.grid(cells, row_labels=labels, scale=1), out)


#: The most rows and columns a map of ``lrpkit explain`` shows; longer axes are summed into bins.
MAP_ROWS, MAP_COLUMNS = 256, 512


def _viewable(sample: Any) -> Any:
    """One sample's relevance as a 2-D array of a size to look at.

    Axes longer than :data:`MAP_ROWS` / :data:`MAP_COLUMNS` are summed into that many bins (relevance
    adds up); short ones are repeated, so that a strip is at least 24 pixels high and 256 wide.
    """
    import numpy as np

    values = sample.detach().double().cpu().numpy()
    values = values.reshape(1, -1) if values.ndim == 1 else values
    values = _binned(_binned(values, 0, MAP_ROWS), 1, MAP_COLUMNS)
    rows, columns = values.shape
    return np.repeat(np.repeat(values, max(1, 24 // rows), axis=0), max(1, 256 // columns), axis=1)


def _binned(values: Any, axis: int, most: int) -> Any:
    """``values`` with runs of neighbours along ``axis`` summed into at most ``most`` bins."""
    import numpy as np

    length = values.shape[axis]
    if length <= most:
        return values
    starts = (np.arange(most) * length) // most  # strictly increasing, as length > most
    return np.add.reduceat(values, starts, axis=axis)


def _vocabulary(path: str | None, inputs: Sequence[Any]) -> list[str] | None:
    """``--vocab``: the token of each id (line n names id n), checked against the ids in ``inputs``."""
    if path is None:
        return None
    ids = [part for part in inputs if not (part.is_floating_point() or part.is_complex())]
    if not ids:
        raise _UsageError(f"--vocab names token ids, and the input holds {inputs[0].dtype} values")
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except OSError as error:
        raise _UsageError(f"--vocab {path!r}: {error.strerror or error}") from error
    tokens = [line.removesuffix("\r") for line in (lines[:-1] if lines[-1] == "" else lines)]
    for part in (part for part in ids if part.numel()):
        if int(part.min()) < 0 or int(part.max()) >= len(tokens):
            raise _UsageError(f"--vocab {path!r} names ids 0 to {len(tokens) - 1}, and the input holds ids "
                              f"{int(part.min())} to {int(part.max())}")
    return tokens


def _names(row: Any, vocabulary: list[str] | None) -> list[str]:
    """Labels of one sample's positions: its tokens, its ids, or its values (features)."""
    if row.is_floating_point():
        return [f"{float(value):.3g}" for value in row]
    if vocabulary is not None:
        return [vocabulary[int(token)] for token in row]
    return [str(int(token)) for token in row]


def _largest(x: Any, relevance: Any, vocabulary: list[str] | None, prefix: str = "", count: int = 5) -> str:
    """Per sample (the first eight) of an (N, L) input: the positions of largest ``|relevance|``."""
    tokens = vocabulary is not None and not x.is_floating_point()
    what = "token" if tokens else "value" if x.is_floating_point() else "id"
    label = repr if tokens else str
    lines = []
    for index in range(min(len(x), 8)):
        values = relevance[index].detach().double().cpu()
        names = _names(x[index], vocabulary)
        order = values.abs().argsort(descending=True)[:count].tolist()
        shown = ", ".join(f"{position} ({what} {label(names[position])}) {float(values[position]):+.4g}" for position in order)
        lines.append(f"{prefix}sample {index}, largest |relevance| at position: {shown}")
    return "\n".join(lines)


def _write_text_page(x: Any, relevance: Any, vocabulary: list[str] | None, out: str) -> Path:
    """An HTML page with one line per sample, each token shaded by its relevance."""
    from lrpkit import image

    lines = [
        f"<p>sample {index}: {image.text_heatmap(_names(x[index], vocabulary), relevance[index])}</p>"
        for index in range(len(x))
    ]
    page = ('<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>lrpkit explanation</title></head><body>\n'
            + "\n".join(lines) + "\n</body></html>\n")
    path = Path(out)
    path.write_text(page, encoding="utf-8")
    return path


def _shown_input(sample: Any) -> Any:
    """A sample as an image: one or three channels as they are, other counts as their mean."""
    from lrpkit import image

    values = sample.detach().float()
    return image.to_rgb(values if values.shape[0] in (1, 3) else values.mean(0))


def _describe_run(args: argparse.Namespace) -> int:
    import lrpkit

    model, x, _ = _model_and_input(args)
    print(lrpkit.describe(model, x, composite=args.composite, target=args.target, output=_selector(args.output)))
    return 0


# ------------------------------------------------------------------------------ bench


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=["models", "rules"],
                        help="'models': whole torchvision models against gradient x input and "
                             "zennit; 'rules': each rule's backward on single layers")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where to run (default: cpu)")
    parser.add_argument("--models", nargs="+", metavar="NAME", default=None,
                        help="models suite: torchvision model names, tiny-vgg / tiny-resnet, or your own "
                             "as path/to/file.py:factory or package.module:factory (default: vgg16 "
                             "resnet50; with --quick: tiny-vgg tiny-resnet)")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="models suite: a state_dict file to load into the model (one model only; "
                             "default: seeded random weights)")
    parser.add_argument("--input-shape", metavar="DIM", type=int, nargs="+", default=None,
                        help="models suite: the input's shape after the batch dimension, for a model "
                             "that does not take 3 x SIZE x SIZE images (inputs are uniform in [0, 1])")
    parser.add_argument("--composites", nargs="+", metavar="NAME", default=None,
                        help="models suite: only these composites, for lrpkit and zennit (Epsilon, "
                             "EpsilonPlus, EpsilonPlusFlat, EpsilonGammaBox, EpsilonAlpha2Beta1; default: all)")
    parser.add_argument("--libraries", nargs="+", choices=("lrpkit", "zennit", "captum"), default=None,
                        help="models suite: only these besides gradient x input, which always runs "
                             "(default: every one installed)")
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
    if args.input_shape is not None and min(args.input_shape) < 1:
        print("lrpkit bench: --input-shape must be at least 1 in every dimension", file=sys.stderr)
        return 2
    if args.weights is not None and (args.models is None or len(args.models) != 1):
        print("lrpkit bench: --weights belongs to one model: give exactly one --models NAME", file=sys.stderr)
        return 2
    benchmarks = _import_benchmarks()
    if benchmarks is None:
        print("lrpkit bench: the benchmarks live in the lrpkit repository, not in the installed "
              "package. Run `lrpkit bench ...` (or `python -m benchmarks ...`) from the root of a "
              "checkout of lrpkit, the directory that contains benchmarks/.", file=sys.stderr)
        return 1
    known = benchmarks.models.COMPOSITES
    unknown = [name for name in args.composites or () if name not in known]
    if unknown:
        print(f"lrpkit bench: unknown composite {unknown[0]!r} for --composites; known: {', '.join(known)}",
              file=sys.stderr)
        return 2
    return int(benchmarks.run_suite(benchmarks.BenchOptions.from_namespace(args)))


COMMANDS: dict[str, Command] = {
    "demo": Command(
        help="explain 8x8 digits with three LRP composites and the gradient, write a PNG",
        add_arguments=_demo_arguments,
        run=_demo_run,
    ),
    "explain": Command(
        help="explain a model's prediction (torchvision, digits-cnn or your own) and write a heatmap",
        add_arguments=_explain_arguments,
        run=_explain_run,
    ),
    "describe": Command(
        help="print every module and captured call of a model with its rule and relevance",
        add_arguments=_model_arguments,
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
    except _UsageError as error:
        print(f"lrpkit {args.command}: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        if "pip install" not in str(error):  # a bug, not a missing optional dependency
            raise
        print(f"lrpkit {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
