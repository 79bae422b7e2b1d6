"""The top-k relevance filter (Fischer 2021): reference implementation, batch independence, composites."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lrpkit import composites, rules
from lrpkit.attribution import Gradient
from lrpkit.rules import relevance_filter


def reference_filter(relevance: np.ndarray, top_k: float) -> np.ndarray:
    """Keep each sample's ``max(1, floor(top_k * n))`` largest values, by sorting (no ties in the data)."""
    flat = relevance.reshape(len(relevance), -1)
    keep = max(1, int(np.floor(top_k * flat.shape[1])))
    result = np.zeros_like(flat)
    for row, values in enumerate(flat):
        threshold = np.sort(values)[::-1][keep - 1]
        result[row] = np.where(values >= threshold, values, 0.0)
    return result.reshape(relevance.shape)


@pytest.mark.parametrize("shape", [(3, 10), (2, 4, 5, 5), (1, 7)])
@pytest.mark.parametrize("top_k", [0.01, 0.05, 0.3, 0.5, 0.99, 1.0])
def test_filter_matches_the_sorting_reference(shape, top_k):
    relevance = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    expected = reference_filter(relevance.numpy(), top_k)
    np.testing.assert_array_equal(relevance_filter(relevance, top_k).numpy(), expected)


def test_filter_keeps_at_least_one_value_and_is_per_sample():
    relevance = torch.tensor([[1.0, 5.0, 3.0], [-4.0, -2.0, -9.0]])
    assert relevance_filter(relevance, 0.1).tolist() == [[0.0, 5.0, 0.0], [0.0, -2.0, 0.0]]


def test_filter_is_batch_independent():
    batch = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    together = relevance_filter(batch, 0.2)
    alone = torch.cat([relevance_filter(sample[None], 0.2) for sample in batch])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("top_k", [0.0, -0.1, 1.5])
def test_invalid_top_k_is_refused_naming_the_argument(top_k):
    with pytest.raises(ValueError, match="top_k"):
        rules.ZPlus(top_k=top_k)
    with pytest.raises(ValueError, match="top_k"):
        composites.EpsilonPlusFlat(top_k=top_k)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()


def epsilon_by_hand(model: nn.Sequential, x: torch.Tensor, target: int, top_k: float, epsilon: float) -> np.ndarray:
    """Epsilon on every dense layer with the filter before each, layer by layer in numpy."""
    layers = [model[0], model[2], model[4]]
    activations = [x.numpy()]
    for index, layer in enumerate(layers):
        z = activations[-1] @ layer.weight.detach().numpy().T + layer.bias.detach().numpy()
        activations.append(np.maximum(z, 0) if index < 2 else z)
    output = activations[-1]
    relevance = np.zeros_like(output)
    relevance[:, target] = output[:, target]
    for index in reversed(range(3)):
        layer, inputs = layers[index], activations[index]
        weight, bias = layer.weight.detach().numpy(), layer.bias.detach().numpy()
        relevance = reference_filter(relevance, top_k)
        z = inputs @ weight.T + bias
        scaled = relevance / np.where(z >= 0, z + epsilon, z - epsilon)
        relevance = inputs * (scaled @ weight)
    return relevance


@pytest.mark.parametrize("top_k", [0.25, 0.5, 1.0])
def test_filtered_epsilon_network_equals_the_hand_computation(top_k):
    model = mlp()
    x = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    layer_map = composites.layer_map_base() + [(nn.Linear, rules.Epsilon(1e-3, top_k=top_k))]
    relevance = Gradient(model, composites.LayerMapComposite(layer_map))(x, target=1).relevance
    np.testing.assert_allclose(relevance.numpy(), epsilon_by_hand(model, x, 1, top_k, 1e-3), rtol=1e-10, atol=1e-12)


def test_filtered_network_result_of_a_sample_does_not_depend_on_the_batch():
    model = mlp()
    x = torch.rand(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    attribution = Gradient(model, composites.EpsilonPlus(top_k=0.3))
    together = attribution(x, target=2).relevance
    alone = torch.cat([attribution(sample[None], target=2).relevance for sample in x])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


def test_preset_passes_top_k_to_every_dense_and_convolutional_rule():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    composite = composites.EpsilonPlusFlat(top_k=0.05)
    with composite.context(model):
        chosen = [composite.rule_of(module) for module in (model[0], model[3])]
    assert [type(rule).__name__ for rule in chosen] == ["Flat", "Epsilon"]
    assert all(rule.top_k == 0.05 for rule in chosen)


def test_filter_sparsifies_the_explanation_of_a_cnn():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    ).eval()
    x = torch.rand(2, 1, 8, 8)
    dense = Gradient(model, composites.EpsilonPlus())(x, target=0).relevance
    sparse = Gradient(model, composites.EpsilonPlus(top_k=0.05))(x, target=0).relevance
    assert (sparse != 0).sum() < (dense != 0).sum()
