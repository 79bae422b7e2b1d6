"""Every rule costs the layer products that docs/performance.md promises, counted exactly.

Time on a shared machine moves by tens of percent between runs; the number of FLOPs spent in
matrix products and convolutions does not. Each test counts them for one explanation of a small
network (``benchmarks.flops``, a dispatch mode) and compares with the floor of the docs' table:
the model's own forward, plus per layer the rule's products times the layer's forward FLOPs
(Epsilon 1, z+ and gamma on non-negative inputs 2, gamma on an output of both signs 3,
alpha-beta 3, ZBox 5, flat 2). A recomputed forward, a lent ReLU output that is not used, or a
second path where one suffices shows up here as a larger count. The last tests count the values
an explanation reads back to the host, each of which makes the host wait for a GPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lrpkit import composites, rules, types
from lrpkit.attribution import Gradient

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is a package at the root of the checkout
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.flops import FlopCounter, count_flops  # noqa: E402


def small_vgg() -> nn.Module:
    def block(inputs: int, outputs: int) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1), nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        *block(3, 6), nn.MaxPool2d(2), *block(6, 8), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 5),
    )


def small_resnet() -> nn.Module:
    """torchvision's ResNet with one basic block per stage: residual sums, downsampling, BatchNorm."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5)


def _seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``factory()`` in eval mode with seeded weights, BatchNorm statistics that are not the identity, frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory().eval()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        return model.requires_grad_(False)


def _input(size: int) -> torch.Tensor:
    """Two images in ``[0, 1]`` (non-negative, as the box of EpsilonGammaBox says)."""
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def layer_flops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """The forward FLOPs of every dense and convolutional layer, by name (2 per multiply-add)."""
    flops: dict[str, int] = {}

    def record(name: str, per_output: int):  # multiply-adds per output element
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            flops[name] = 2 * output.numel() * per_output
        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            per_output = module.in_features
        else:
            continue
        handles.append(module.register_forward_hook(record(name, per_output)))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return flops


def explanation_flops(model: nn.Module, x: torch.Tensor, composite: composites.Composite) -> int:
    """FLOPs of one explanation after a first call (which probes the model for its BatchNorm pairs)."""
    attributor = Gradient(model, composite)
    attributor(x)
    return count_flops(lambda: attributor(x))


def gradient_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of gradient x input's forward and backward."""
    def gradient() -> None:
        inputs = x.clone().requires_grad_(True)
        torch.autograd.grad(model(inputs).sum(), inputs)

    return count_flops(gradient)


def floor(flops: dict[str, int], products: dict[str, int]) -> int:
    """The model's forward plus each layer's rule products."""
    return sum(flops.values()) + sum(products[name] * value for name, value in flops.items())


def epsilon_only() -> composites.Composite:
    return composites.LayerMapComposite(composites.layer_map_base() + [(types.AnyLinear, rules.Epsilon())])


#: The dense layers of small_vgg and small_resnet (epsilon in every composite).
DENSE = ("9", "11", "fc")


@pytest.fixture(scope="module")
def vgg():
    model = _seeded(small_vgg)
    x = _input(16)
    return model, x, layer_flops(model, x)


@pytest.fixture(scope="module")
def resnet():
    model = _seeded(small_resnet)
    x = _input(32)
    return model, x, layer_flops(model, x)


def test_the_counter_counts_a_gradient_as_one_forward_and_one_transposed_product(vgg):
    model, x, flops = vgg
    assert gradient_flops(model, x) == 2 * sum(flops.values())
    with FlopCounter() as counter, torch.no_grad():
        model(x)
    assert counter.flops == sum(flops.values()) and set(counter.by_operation) == {"convolution", "addmm"}


@pytest.mark.parametrize("which", ["vgg", "resnet"])
def test_epsilon_costs_exactly_the_gradient(which, request):
    model, x, flops = request.getfixturevalue(which)
    assert explanation_flops(model, x, epsilon_only()) == gradient_flops(model, x) == floor(flops, dict.fromkeys(flops, 1))


@pytest.mark.parametrize("which", ["vgg", "resnet"])
@pytest.mark.parametrize(
    ("composite", "per_convolution"),
    [(composites.EpsilonPlus, 2), (composites.EpsilonPlusFlat, 2), (composites.EpsilonAlpha2Beta1, 3)],
)
def test_z_plus_and_alpha_beta_cost_their_floor_on_every_convolution(which, composite, per_convolution, request):
    model, x, flops = request.getfixturevalue(which)
    products = {name: 1 if name in DENSE else per_convolution for name in flops}
    assert explanation_flops(model, x, composite()) == floor(flops, products)


def test_gamma_and_zbox_cost_their_floor(vgg, resnet):
    model, x, flops = vgg
    products = {"0": 5, "4": 2, "9": 1, "11": 1}  # ZBox first; gamma below a ReLU: one sign only
    assert explanation_flops(model, x, composites.EpsilonGammaBox(low=0.0, high=1.0)) == floor(flops, products)
    model, x, flops = resnet
    # into a residual sum (conv2, downsample) the output has both signs: 3 products; below a ReLU 2
    products = {
        name: 5 if name == "conv1" else 1 if name == "fc" else 3 if name.endswith(("conv2", "downsample.0")) else 2
        for name in flops
    }
    assert explanation_flops(model, x, composites.EpsilonGammaBox(low=0.0, high=1.0)) == floor(flops, products)


# -- values read back to the host: on a GPU each one waits for the device ----------------------
def host_reads(explain: Callable[[], object]) -> int:
    """How many tensor values ``explain()`` reads back to the host (``aten::_local_scalar_dense``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        explain()
    return sum(1 for event in recorded.events() if event.name == "aten::_local_scalar_dense")


@pytest.mark.parametrize("composite", [epsilon_only, composites.EpsilonPlusFlat], ids=["Epsilon", "EpsilonPlusFlat"])
def test_epsilon_and_z_plus_read_nothing_back(composite, resnet):
    """Every lent ReLU output is certified, through the residual sums and the stem's max pooling too."""
    model, x, _ = resnet
    explain = Gradient(model, composite())
    explain(x)  # (the first call probes the BatchNorm merge)
    assert host_reads(lambda: explain(x)) == 0


def test_alpha_beta_reads_at_most_one_value_per_layer(resnet):
    """Its check of ``z - z+`` against cancellation, one reduction per layer; nothing else."""
    model, x, _ = resnet
    layers = sum(isinstance(module, (nn.Conv2d, nn.Linear)) for module in model.modules())
    explain = Gradient(model, composites.EpsilonAlpha2Beta1())
    explain(x)
    assert 0 < host_reads(lambda: explain(x)) <= layers
