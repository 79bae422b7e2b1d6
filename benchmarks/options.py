"""What a benchmark run measures: one :class:`BenchOptions`, built from the command line."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Where results go unless ``--out`` says otherwise: ``benchmarks/results/`` in the checkout.
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass
class BenchOptions:
    """Options shared by both suites; ``None`` means "the suite's default".

    Attributes
    ----------
    suite
        ``"models"`` or ``"rules"``.
    device
        ``"cpu"`` or ``"cuda"``.
    models
        Model names for the models suite (see :data:`benchmarks.models.MODELS`).
    batches
        Batch sizes.
    repeats
        Timed repeats per measurement; the median is reported.
    warmup
        Untimed calls before the timed ones.
    size
        Input height and width in pixels (models suite).
    input_shape
        Models suite: the input's shape after the batch dimension, for a model that does not take
        ``(3, size, size)`` images (``None``: ``(3, size, size)``).
    weights
        Models suite: a ``state_dict`` file loaded into the (single) model.
    out
        Directory for the JSON and markdown files.
    quick
        Tiny models, layers and sizes, one repeat: a smoke test, not a measurement.
    memory
        Measure peak memory (models suite; on the CPU one child process per configuration).
    threads
        ``torch.set_num_threads`` for the run (``None``: torch's default).
    malloc
        ``"default"``: the C allocator as it comes; ``"tuned"``: glibc's heap trimming and
        dynamic mmap threshold turned off for every method (see :func:`benchmarks.timing.tune_malloc`).
    composites
        Models suite: the composites lrpkit and zennit run (``None``: all of
        :data:`benchmarks.models.COMPOSITES`).
    libraries
        Models suite: which of ``lrpkit``, ``zennit`` and ``captum`` run besides the gradient,
        the baseline that always runs (``None``: every one installed).
    """

    suite: str
    device: str = "cpu"
    models: list[str] | None = None
    batches: list[int] | None = None
    repeats: int | None = None
    warmup: int | None = None
    size: int | None = None
    input_shape: list[int] | None = None
    weights: str | None = None
    out: Path = field(default_factory=lambda: DEFAULT_OUT)
    quick: bool = False
    memory: bool = True
    threads: int | None = None
    malloc: str = "default"
    composites: list[str] | None = None
    libraries: list[str] | None = None

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> BenchOptions:
        """Build the options from ``lrpkit bench``'s parsed arguments."""
        return cls(
            suite=args.suite,
            device=args.device,
            models=args.models,
            batches=args.batch,
            repeats=args.repeats,
            warmup=args.warmup,
            size=args.size,
            input_shape=args.input_shape,
            weights=args.weights,
            out=Path(args.out) if args.out is not None else DEFAULT_OUT,
            quick=args.quick,
            memory=not args.no_memory,
            threads=args.threads,
            malloc=args.malloc,
            composites=getattr(args, "composites", None),
            libraries=getattr(args, "libraries", None),
        )

    def resolved(self, **defaults: Any) -> BenchOptions:
        """A copy with every ``None`` field replaced by ``defaults[name]`` (when given)."""
        values = asdict(self)
        for name, value in defaults.items():
            if values.get(name) is None:
                values[name] = value
        return BenchOptions(**values)

    def shape(self) -> tuple[int, ...]:
        """The models suite's input shape after the batch dimension (after :meth:`resolved`)."""
        if self.input_shape is not None:
            return tuple(self.input_shape)
        assert self.size is not None
        return (3, self.size, self.size)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view (paths as strings)."""
        values = asdict(self)
        values["out"] = str(self.out)
        return values
