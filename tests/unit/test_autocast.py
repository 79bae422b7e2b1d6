"""Models run under ``torch.autocast``: the rules compute in the widest dtype, autocast off.

Under autocast a layer's input, output and parameters may differ in dtype (bfloat16 products,
float32 parameters). Each rule's backward then runs in the widest of them with autocast off;
the forward is the user's, unchanged. The results agree with the float32 explanation to
bfloat16's precision, and relevance is conserved to it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from helpers import hooks_left
from lrpkit import composites
from lrpkit.attribution import Gradient

LOW_PRECISION = torch.bfloat16
COMPOSITES = {
    "EpsilonPlusFlat": composites.EpsilonPlusFlat,
    "EpsilonGammaBox": lambda: composites.EpsilonGammaBox(low=-3.0, high=3.0),
    "EpsilonAlpha2Beta1": composites.EpsilonAlpha2Beta1,
}


def resnet() -> nn.Module:
    """torchvision's ResNet18 (BatchNorm merged virtually and by copy, residual sums captured)."""
    model = torchvision.models.resnet18(weights=None, num_classes=5)
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 1.5, generator=generator)
            module.weight.data.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def vision_transformer() -> nn.Module:
    """A two-block ViT (attention, layer norm and GELU captured or mapped)."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return model.eval()


def swin() -> nn.Module:
    """A two-block Swin: its attention's ``F.linear`` calls are captured as dense layers (their weights in the call)."""
    torch.manual_seed(0)
    model = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2], num_heads=[2], window_size=[2, 2], num_classes=5
    )
    nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


MODELS = {"resnet18": (resnet, 32), "vit": (vision_transformer, 16), "swin": (swin, 16)}


def images(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("composite", COMPOSITES.values(), ids=COMPOSITES.keys())
@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_under_autocast_the_explanation_is_the_float32_one(build, composite) -> None:
    factory, size = build
    model, x = factory(), images(size)
    original = copy.deepcopy(model.state_dict())
    expected = Gradient(model, composite())(x, target=1)
    with torch.autocast("cpu", dtype=LOW_PRECISION):
        plain_output = model(x)
        result = Gradient(model, composite())(x, target=1)
    assert result.output.dtype == plain_output.dtype == LOW_PRECISION
    torch.testing.assert_close(result.output, plain_output, rtol=2e-2, atol=2e-2)
    assert result.relevance.dtype == x.dtype
    similarity = nn.functional.cosine_similarity(result.relevance.flatten(), expected.relevance.flatten(), dim=0)
    assert similarity > 0.98
    assert hooks_left(model) == []
    assert all(torch.equal(value, original[key]) for key, value in model.state_dict().items())


def test_under_autocast_relevance_is_conserved_to_bfloat16_precision() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 3, bias=False),
    ).eval()
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for composite in (composites.EpsilonPlus, composites.EpsilonAlpha2Beta1):
        with torch.autocast("cpu", dtype=LOW_PRECISION):
            result = Gradient(model, composite(epsilon=1e-9, stabilizer=1e-9))(x, target=0)
        totals = result.relevance.sum(dim=(1, 2, 3))
        torch.testing.assert_close(totals, result.output[:, 0].float(), rtol=5e-2, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("composite", COMPOSITES.values(), ids=COMPOSITES.keys())
@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_under_cuda_autocast_in_float16_the_explanation_is_the_float32_one(build, composite) -> None:
    factory, size = build
    model, x = factory().cuda(), images(size).cuda()
    expected = Gradient(model, composite())(x, target=1)
    with torch.autocast("cuda", dtype=torch.float16):
        result = Gradient(model, composite())(x, target=1)
    assert result.output.dtype == torch.float16 and result.relevance.dtype == x.dtype
    similarity = nn.functional.cosine_similarity(result.relevance.flatten(), expected.relevance.flatten(), dim=0)
    assert similarity > 0.98
    assert hooks_left(model) == []
