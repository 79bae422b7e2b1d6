"""Check how lrpkit explains timm models: is relevance conserved, is the model left as it was?

Needs timm (``pip install timm``; models are built with ``pretrained=False``, nothing is
downloaded). For each model name:

* the model is built with random weights and BatchNorm statistics taken from one batch of noise
  (so that activations have a realistic scale), in eval mode;
* it is explained with ``EpsilonGammaBox`` and ``EpsilonPlusFlat``: the output must equal the
  plain forward pass, the relevance must be finite and the parameters unchanged afterwards;
* a copy with every bias, BatchNorm mean, class token and position embedding set to zero (the
  parameters that absorb relevance) is explained with stabilisers of 1e-12: the relevance must
  then sum to the logit. EpsilonPlusFlat's z+ drops relevance at units with a negative output in
  models whose convolutions see signed inputs (depthwise and linear-bottleneck designs), so a
  large error there is that rule's, not a bug; EpsilonGammaBox conserves.

Run it as ``python examples/timm_models.py resnet50d efficientnet_b0 swin_tiny_patch4_window7_224``.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lrpkit import composites
from lrpkit.attribution import Gradient
from lrpkit.canonizers import FunctionalCapture, MergeBatchNorm

#: Parameters besides biases that absorb relevance like them, zeroed for the conservation check.
POSITIONAL = (
    "pos_embed", "pixel_pos", "patch_pos", "cls_token", "dist_token", "reg_token",
    "relative_position_bias_table", "rel_pos", "attention_biases",
)


def build(name: str, size: int) -> nn.Module:
    """A timm model with random weights and BatchNorm statistics of one batch, float64, eval mode."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():  # a zero-initialised head
                module.weight.normal_(0.0, 0.02)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # the running statistics become those of the batch below
        model.train()
        model(torch.rand(4, 3, size, size, dtype=torch.float64))
    return model.eval()


def without_absorbers(model: nn.Module) -> nn.Module:
    """A copy whose biases, BatchNorm means, class tokens and position embeddings are zero."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for module in plain.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
        for name, parameter in plain.named_parameters():
            parts = name.split(".")
            # a position embedding is a parameter or a module of its own (XCiT's Fourier encoding's projection)
            positional = any(token in part for part in parts for token in POSITIONAL)
            if (parts[-1] in ("bias", "beta") and parameter.ndim == 1) or positional:
                parameter.zero_()
    return plain


COMPOSITES: dict[str, Callable[[float], composites.Composite]] = {
    "EpsilonGammaBox": lambda stabilizer: composites.EpsilonGammaBox(
        low=0.0, high=1.0, epsilon=stabilizer, stabilizer=stabilizer,
        canonizers=[MergeBatchNorm(), FunctionalCapture(stabilizer=stabilizer)],
    ),
    "EpsilonPlusFlat": lambda stabilizer: composites.EpsilonPlusFlat(
        epsilon=stabilizer, stabilizer=stabilizer, canonizers=[MergeBatchNorm(), FunctionalCapture(stabilizer=stabilizer)],
    ),
}


def check(
    model: nn.Module, x: torch.Tensor, explainer: Callable[[float], composites.Composite], plain: nn.Module
) -> dict[str, object]:
    """One model, one composite: forward unchanged, model restored, finite, conservation error, warnings.

    ``explainer(stabilizer)`` builds the composite; ``plain`` is the model without the parameters
    that absorb relevance (:func:`without_absorbers`), on which the conservation error is measured
    with stabilisers of 1e-12. ``warnings`` lists lrpkit's warning classes.
    """
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output, relevance = Gradient(model, explainer(1e-6))(x)
    restored = all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    plain_output, plain_relevance = Gradient(plain, explainer(1e-12))(x)
    logit = plain_output.max(dim=1).values
    error = ((plain_relevance.flatten(1).sum(dim=1) - logit).abs() / logit.abs()).max().item()
    return {
        # merged BatchNorms round differently: equal to float64 rounding, not bit for bit
        "same output": torch.allclose(output, expected, rtol=1e-10, atol=1e-12),
        "restored": restored,
        "finite": bool(torch.isfinite(relevance).all()),
        "conservation error": error,
        "warnings": sorted(
            {type(warning.message).__name__ for warning in caught if "lrpkit" in type(warning.message).__module__}
        ),
    }


def main(names: Sequence[str], size: int = 64) -> dict[str, dict[str, dict[str, object]]]:
    """Check every model in ``names`` at ``size`` x ``size``; print one line per model and composite."""
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results: dict[str, dict[str, dict[str, object]]] = {}
    for name in names:
        model = build(name, size)
        plain = without_absorbers(model)
        results[name] = {preset: check(model, x, make, plain) for preset, make in COMPOSITES.items()}
        for composite, result in results[name].items():
            print(f"{name:32s} {composite:16s} " + ", ".join(f"{key}: {value}" for key, value in result.items()))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="timm model names, e.g. resnet50d efficientnet_b0")
    parser.add_argument("--size", type=int, default=64, help="input height and width (ViTs need their own: 224)")
    arguments = parser.parse_args()
    main(arguments.names, arguments.size)
