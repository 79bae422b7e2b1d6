"""lrpkit: Layer-wise Relevance Propagation for any PyTorch model.

Rules are attached to modules as hooks, chosen per module by composites, after canonizers have
brought the model into a form LRP can explain. The model is never rewritten by the user and is
restored exactly after every context.

Examples
--------
>>> import torch, lrpkit
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> output, relevance = lrpkit.explain(model, torch.rand(2, 4))
>>> relevance.shape
torch.Size([2, 4])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from . import attribution, captured, canonizers, composites, evaluation, image, patterns, rules, tokens, types
from .attribution import (
    Attribution,
    Gradient,
    GradientXInput,
    Inputs,
    IntegratedGradients,
    Occlusion,
    OutputSelector,
    Sensitivity,
    SmoothGrad,
    Target,
)
from .composites import Composite
from .report import Description, describe

__version__ = "0.1.0"


def explain(
    model: nn.Module,
    x: Inputs,
    composite: str | Composite | None = "epsilon_plus_flat",
    target: Target = None,
    model_kwargs: Mapping[str, Any] | None = None,
    output: OutputSelector = None,
) -> Attribution:
    """Explain ``model``'s prediction on ``x`` in one call.

    Parameters
    ----------
    model
        The model (put it in ``eval()`` mode first).
    x
        A floating-point input batch, or integer token ids (explained through the model's
        ``nn.Embedding``, one relevance per token; see :mod:`lrpkit.tokens`), or a tuple of them
        for a model with several inputs (``model(*x)``; the relevance is then a tuple too).
    composite
        A preset name (see :func:`lrpkit.composites.names`), a composite, or ``None`` for the plain
        gradient. For ``"epsilon_gamma_box"`` the z^B bounds are the minimum and maximum of ``x``.
    target
        What to explain; see :mod:`lrpkit.attribution`.
    model_kwargs
        Keyword arguments for the model call that are not explained (an attention mask).
    output
        For a model that returns a tuple, dict or ``ModelOutput``: an index, a key or a callable
        that selects the tensor to explain, e.g. ``lambda out: out.logits[:, -1]`` for the next
        token of a causal language model.

    Returns
    -------
    Attribution
        Unpacks as ``output, relevance``.
    """
    if isinstance(composite, str):
        composite = composites.get_for_input(composite, x)
    return Gradient(model, composite=composite, output=output)(x, target=target, model_kwargs=model_kwargs)


__all__ = [
    "Attribution",
    "Composite",
    "Description",
    "Gradient",
    "GradientXInput",
    "IntegratedGradients",
    "Occlusion",
    "Sensitivity",
    "SmoothGrad",
    "attribution",
    "canonizers",
    "captured",
    "composites",
    "describe",
    "evaluation",
    "explain",
    "image",
    "patterns",
    "rules",
    "tokens",
    "types",
]
