"""PyTorch's own transformer layers (``nn.TransformerEncoder``, ``nn.Transformer``): explained as they are.

Their attention is ``nn.MultiheadAttention`` (captured as ``multi_head_attention_forward``:
``AttentionValue``), their norms ``nn.LayerNorm``, their residual sums captured additions. With
zero biases and stabilisers of 1e-12 the relevance sums to the logit; the forward output and the
model are unchanged, and no module is reported uncovered.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import hooks_left
from lrpkit import composites
from lrpkit.attribution import Gradient

DTYPE = torch.float64
SMALL = {"epsilon": 1e-12, "stabilizer": 1e-12}


class EncoderClassifier(nn.Module):
    """A two-layer ``nn.TransformerEncoder`` and a dense head on the first position (a class token)."""

    def __init__(self, norm_first: bool, activation: str, batch_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, activation=activation,
                                           batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if norm_first else None,
                                             enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.encoder(x if self.batch_first else x.transpose(0, 1), src_key_padding_mask=padding)
        hidden = hidden if self.batch_first else hidden.transpose(0, 1)
        return self.head(hidden[:, 0])


class EncoderDecoder(nn.Module):
    """``nn.Transformer`` with a causal target mask; the logits of the last target position."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Transformer(16, 2, 2, 2, 32, dropout=0.1, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(target.shape[1], dtype=source.dtype)
        return self.head(self.transformer(source, target, tgt_mask=causal)[:, -1])


def without_biases(model: nn.Module) -> nn.Module:
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in plain.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    return plain.eval()


def explained(model: nn.Module, inputs, **call):
    """``Gradient`` with EpsilonPlusFlat and small stabilisers; warnings are errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Gradient(model, composites.EpsilonPlusFlat(**SMALL))(inputs, **call)


@pytest.mark.parametrize(
    ("norm_first", "activation", "batch_first"),
    [(False, "relu", True), (True, "gelu", True), (False, "gelu", False)],
    ids=["post-norm-relu", "pre-norm-gelu", "sequence-first"],
)
def test_encoder_conserves(norm_first: bool, activation: str, batch_first: bool) -> None:
    torch.manual_seed(0)
    model = without_biases(EncoderClassifier(norm_first, activation, batch_first).to(DTYPE))
    x = torch.randn(2, 5, 16, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    # with gradients on (under no_grad, eval mode, torch takes its fused fast path: rounding apart)
    expected = model(x.clone().requires_grad_(True)).detach()
    before = copy.deepcopy(model.state_dict())
    output, relevance = explained(model, x)
    assert torch.equal(output, expected)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert hooks_left(model) == []
    logit = output.max(dim=1).values
    assert ((relevance.sum(dim=(1, 2)) - logit).abs() / logit.abs()).max() < 1e-8


def test_padded_tokens_get_no_relevance() -> None:
    """Masked out as keys (``src_key_padding_mask`` in ``model_kwargs``) and never read: no relevance."""
    torch.manual_seed(0)
    model = without_biases(EncoderClassifier(False, "relu", True).to(DTYPE))
    x = torch.randn(2, 5, 16, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    padding = torch.tensor([[False] * 5, [False, False, False, True, True]])
    output, relevance = explained(model, x, model_kwargs={"padding": padding})
    assert torch.equal(relevance[1, 3:], torch.zeros_like(relevance[1, 3:]))
    assert relevance[1, :3].abs().sum() > 0
    logit = output.max(dim=1).values
    assert ((relevance.sum(dim=(1, 2)) - logit).abs() / logit.abs()).max() < 1e-8


def test_encoder_decoder_with_two_inputs_conserves() -> None:
    torch.manual_seed(0)
    model = without_biases(EncoderDecoder().to(DTYPE))
    generator = torch.Generator().manual_seed(1)
    source, target = torch.randn(2, 5, 16, dtype=DTYPE, generator=generator), torch.randn(2, 4, 16, dtype=DTYPE, generator=generator)
    output, (source_relevance, target_relevance) = explained(model, (source, target))
    logit = output.max(dim=1).values
    total = source_relevance.sum(dim=(1, 2)) + target_relevance.sum(dim=(1, 2))
    assert ((total - logit).abs() / logit.abs()).max() < 1e-8
    assert source_relevance.abs().sum() > 0 and target_relevance.abs().sum() > 0
