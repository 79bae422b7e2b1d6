"""Benchmarks of lrpkit against the plain gradient, zennit 0.5.1 and (when installed) Captum.

Two suites, each run from a checkout of the repository (this package is not installed with
lrpkit):

``models``
    Whole torchvision models (VGG16, ResNet50 with random weights): time and peak memory of one
    explanation per composite, as ratios to gradient x input and to zennit with the same
    composite, all measured in one run.
``rules``
    Each rule on single layers (dense, convolutions, depthwise, transposed): the time of the
    rule's backward relative to the layer's plain input gradient, next to the number of
    layer-sized products the rule needs (its floor).

Run them with ``lrpkit bench models|rules [...]`` or ``python -m benchmarks models|rules [...]``;
results are printed as markdown and written as JSON and markdown to ``--out``.

Examples
--------
>>> from benchmarks import SUITES
>>> sorted(SUITES)
['models', 'rules']
"""

from __future__ import annotations

from .options import BenchOptions
from .suites import SUITES, run_suite

__all__ = ["SUITES", "BenchOptions", "run_suite"]
