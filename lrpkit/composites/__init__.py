"""Composites choose a rule per module (by type or by name) and attach them reversibly.

Examples
--------
>>> import torch
>>> from lrpkit import composites
>>> from lrpkit.attribution import Gradient
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
...                             torch.nn.Linear(8, 3))
>>> composite = composites.EpsilonPlusFlat()
>>> with composite.context(model):
...     output, relevance = Gradient(model)(torch.rand(1, 1, 4, 4))
>>> relevance.shape
torch.Size([1, 1, 4, 4])
"""

from .maps import (
    Composite,
    FirstLayerChoice,
    LayerMapComposite,
    MixedComposite,
    NameMapComposite,
    SpecialFirstLayerMapComposite,
    UncoveredModuleWarning,
    in_context,
)
from .presets import (
    Deconvnet,
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    ExcitationBackprop,
    GuidedBackprop,
    get,
    get_for_input,
    layer_map_base,
    names,
    register,
)

__all__ = [
    "Composite",
    "Deconvnet",
    "EpsilonAlpha2Beta1",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonGammaBox",
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "ExcitationBackprop",
    "FirstLayerChoice",
    "GuidedBackprop",
    "LayerMapComposite",
    "MixedComposite",
    "NameMapComposite",
    "SpecialFirstLayerMapComposite",
    "UncoveredModuleWarning",
    "get",
    "get_for_input",
    "in_context",
    "layer_map_base",
    "names",
    "register",
]
