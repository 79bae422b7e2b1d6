"""Explain Hugging Face transformers models: relevance per token, and a check of the explanation.

Needs transformers (``pip install transformers``). Nothing is downloaded: every model is built
from a small config with random weights (pass your own model, loaded from a local path with
``from_pretrained(path)``, to :func:`token_relevance`).

A text model takes token ids, which have no gradient; lrpkit's attributors explain them
through the model's token embedding (``lrpkit.tokens``) and sum the relevance of each token's
embedding vector: :func:`token_relevance` passes the ids, with the attention mask, through
:class:`IdsToLogits`, which returns the logits (of the last position, for a causal language
model). :class:`Seq2SeqToLogits` takes an encoder-decoder model's encoder and decoder ids as two
inputs; :func:`seq2seq_conservation` checks that their relevances together sum to the logit
(T5, BART). The checks below start from the embeddings instead (:class:`EmbeddingsToLogits`, the
same model as a function of ``inputs_embeds``), to explain random vectors. A vision model is
explained from ``pixel_values`` (:class:`PixelsToLogits`).

For each model name, :func:`main` runs the timm example's ``check`` (imported from
``timm_models.py``, which needs no timm to import): with ``EpsilonGammaBox`` and
``EpsilonPlusFlat`` the output equals the plain forward pass, the relevance is finite and the
parameters are unchanged; and a copy with every bias, position embedding and class token set to
zero (they absorb relevance) explained with stabilisers of 1e-12 has relevance summing to the
logit.

Run it as ``python examples/transformers_models.py gpt2 llama bert vit``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lrpkit import composites, rules
from lrpkit.attribution import Gradient
from lrpkit.canonizers import FunctionalCapture, MergeBatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timm_models import check  # noqa: E402  (the same checks as for timm models; timm is not needed)

WIDTH = 32


def _small(name: str) -> nn.Module:
    """A small model of the architecture ``name``, random weights."""
    import transformers as hf

    text = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 50}
    factories: dict[str, Callable[[], nn.Module]] = {
        "bert": lambda: hf.BertForSequenceClassification(hf.BertConfig(hidden_size=WIDTH, num_labels=3, **text)),
        "roberta": lambda: hf.RobertaForSequenceClassification(
            hf.RobertaConfig(hidden_size=WIDTH, num_labels=3, **text)
        ),
        "albert": lambda: hf.AlbertForSequenceClassification(
            hf.AlbertConfig(hidden_size=WIDTH, embedding_size=WIDTH, num_labels=3, **text)
        ),
        "electra": lambda: hf.ElectraForSequenceClassification(
            hf.ElectraConfig(hidden_size=WIDTH, embedding_size=WIDTH, num_labels=3, **text)
        ),
        "deberta-v2": lambda: hf.DebertaV2ForSequenceClassification(
            hf.DebertaV2Config(hidden_size=WIDTH, num_labels=3, **text)
        ),
        "distilbert": lambda: hf.DistilBertForSequenceClassification(
            hf.DistilBertConfig(dim=WIDTH, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=50, num_labels=3)
        ),
        "fnet": lambda: hf.FNetForSequenceClassification(hf.FNetConfig(hidden_size=WIDTH, num_labels=3, **text)),
        "esm": lambda: hf.EsmForSequenceClassification(
            hf.EsmConfig(hidden_size=WIDTH, num_labels=3, pad_token_id=1, mask_token_id=2, **text)
        ),
        "mobilebert": lambda: hf.MobileBertForSequenceClassification(hf.MobileBertConfig(
            hidden_size=WIDTH, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
            num_feedforward_networks=2, num_labels=3, **text)),
        "gpt2": lambda: hf.GPT2LMHeadModel(hf.GPT2Config(n_embd=WIDTH, n_layer=2, n_head=2, vocab_size=50)),
        "llama": lambda: hf.LlamaForCausalLM(hf.LlamaConfig(hidden_size=WIDTH, num_key_value_heads=1, **text)),
        "mistral": lambda: hf.MistralForCausalLM(hf.MistralConfig(hidden_size=WIDTH, num_key_value_heads=1, **text)),
        "qwen2": lambda: hf.Qwen2ForCausalLM(hf.Qwen2Config(hidden_size=WIDTH, num_key_value_heads=1, **text)),
        "gemma": lambda: hf.GemmaForCausalLM(
            hf.GemmaConfig(hidden_size=WIDTH, num_key_value_heads=1, head_dim=16, **text)
        ),
        "phi": lambda: hf.PhiForCausalLM(hf.PhiConfig(hidden_size=WIDTH, **text)),
        "opt": lambda: hf.OPTForCausalLM(
            hf.OPTConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, vocab_size=50,
                         word_embed_proj_dim=WIDTH)
        ),
        "gpt_neox": lambda: hf.GPTNeoXForCausalLM(hf.GPTNeoXConfig(hidden_size=WIDTH, **text)),
        "bloom": lambda: hf.BloomForCausalLM(hf.BloomConfig(hidden_size=WIDTH, n_layer=2, n_head=2, vocab_size=50)),
        "t5-encoder": lambda: hf.T5EncoderModel(
            hf.T5Config(d_model=WIDTH, num_layers=2, num_heads=2, d_ff=64, d_kv=16, vocab_size=50)
        ),
        "mixtral": lambda: hf.MixtralForCausalLM(  # its experts written out: F.linear and index_add_
            hf.MixtralConfig(hidden_size=WIDTH, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                             experts_implementation="eager", **text)
        ),
        "gemma2": lambda: hf.Gemma2ForCausalLM(
            hf.Gemma2Config(hidden_size=WIDTH, num_key_value_heads=1, head_dim=16, **text)
        ),
        "qwen3": lambda: hf.Qwen3ForCausalLM(hf.Qwen3Config(hidden_size=WIDTH, num_key_value_heads=1, head_dim=16, **text)),
        "phi3": lambda: hf.Phi3ForCausalLM(hf.Phi3Config(hidden_size=WIDTH, num_key_value_heads=1, pad_token_id=0, **text)),
        "olmo": lambda: hf.OlmoForCausalLM(hf.OlmoConfig(hidden_size=WIDTH, **text)),
        "apertus": lambda: hf.ApertusForCausalLM(hf.ApertusConfig(hidden_size=WIDTH, num_key_value_heads=1, **text)),
        "falcon": lambda: hf.FalconForCausalLM(
            hf.FalconConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)
        ),
        "gpt_bigcode": lambda: hf.GPTBigCodeForCausalLM(hf.GPTBigCodeConfig(n_embd=WIDTH, n_layer=2, n_head=2, vocab_size=50)),
        "starcoder2": lambda: hf.Starcoder2ForCausalLM(hf.Starcoder2Config(hidden_size=WIDTH, num_key_value_heads=1, **text)),
        "mpt": lambda: hf.MptForCausalLM(hf.MptConfig(d_model=WIDTH, n_layers=2, n_heads=2, vocab_size=50)),
        "gptj": lambda: hf.GPTJForCausalLM(hf.GPTJConfig(n_embd=WIDTH, n_layer=2, n_head=2, vocab_size=50, rotary_dim=8)),
        "xlm-roberta": lambda: hf.XLMRobertaForSequenceClassification(
            hf.XLMRobertaConfig(hidden_size=WIDTH, num_labels=3, **text)
        ),
        "modernbert": lambda: hf.ModernBertForSequenceClassification(
            hf.ModernBertConfig(hidden_size=WIDTH, num_labels=3, pad_token_id=0, **text)
        ),
        "vit": lambda: hf.ViTForImageClassification(
            hf.ViTConfig(hidden_size=WIDTH, image_size=32, patch_size=8, num_labels=3, **_vision(text))
        ),
        "dinov2": lambda: hf.Dinov2ForImageClassification(
            hf.Dinov2Config(hidden_size=WIDTH, image_size=32, patch_size=8, num_labels=3,
                            num_hidden_layers=2, num_attention_heads=2)
        ),
        "beit": lambda: hf.BeitForImageClassification(
            hf.BeitConfig(hidden_size=WIDTH, image_size=32, patch_size=8, num_labels=3,
                          use_relative_position_bias=True, **_vision(text))
        ),
        "swin": lambda: hf.SwinForImageClassification(
            hf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                          window_size=4, num_labels=3)
        ),
        "deit": lambda: hf.DeiTForImageClassificationWithTeacher(
            hf.DeiTConfig(hidden_size=WIDTH, image_size=32, patch_size=8, num_labels=3, **_vision(text))
        ),
        "siglip-vision": lambda: hf.SiglipVisionModel(
            hf.SiglipVisionConfig(hidden_size=WIDTH, image_size=32, patch_size=8, **_vision(text))
        ),
        "convnext": lambda: hf.ConvNextForImageClassification(
            hf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
        ),
        "convnextv2": lambda: hf.ConvNextV2ForImageClassification(
            hf.ConvNextV2Config(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
        ),
        "poolformer": lambda: hf.PoolFormerForImageClassification(
            hf.PoolFormerConfig(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_labels=3)
        ),
        "clip-vision": lambda: hf.CLIPVisionModelWithProjection(
            hf.CLIPVisionConfig(hidden_size=WIDTH, image_size=32, patch_size=8, projection_dim=3, **_vision(text))
        ),
        # mixtures of experts with transformers' default experts, torch._grouped_mm (float32)
        "mixtral-grouped": lambda: hf.MixtralForCausalLM(
            hf.MixtralConfig(hidden_size=WIDTH, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, **text)
        ),
        "qwen3_moe": lambda: hf.Qwen3MoeForCausalLM(
            hf.Qwen3MoeConfig(hidden_size=WIDTH, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=32, head_dim=16, **text)
        ),
        "qwen2_moe": lambda: hf.Qwen2MoeForCausalLM(
            hf.Qwen2MoeConfig(hidden_size=WIDTH, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=32, shared_expert_intermediate_size=32, **text)
        ),
        "olmoe": lambda: hf.OlmoeForCausalLM(
            hf.OlmoeConfig(hidden_size=WIDTH, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, **text)
        ),
        "deepseek_v3": lambda: hf.DeepseekV3ForCausalLM(
            hf.DeepseekV3Config(hidden_size=WIDTH, num_key_value_heads=1, n_routed_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=32, n_group=1, topk_group=1, first_k_dense_replace=1,
                                q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                v_head_dim=16, **text)
        ),
        "granitemoe": lambda: hf.GraniteMoeForCausalLM(
            hf.GraniteMoeConfig(hidden_size=WIDTH, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                                **text)
        ),
        "phimoe": lambda: hf.PhimoeForCausalLM(
            hf.PhimoeConfig(hidden_size=WIDTH, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, **text)
        ),
        "llama4": lambda: hf.Llama4ForCausalLM(
            hf.Llama4TextConfig(hidden_size=WIDTH, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=1,
                                head_dim=16, intermediate_size_mlp=64, interleave_moe_layer_step=1, **text)
        ),
    }
    if name not in factories:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(factories)}")
    return factories[name]()


def _vision(text: dict[str, int]) -> dict[str, int]:
    return {key: value for key, value in text.items() if key != "vocab_size"}


MODELS = (
    "bert", "roberta", "xlm-roberta", "albert", "electra", "deberta-v2", "distilbert", "modernbert", "gpt2",
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "olmo", "opt", "gpt_neox",
    "gptj", "falcon", "gpt_bigcode", "starcoder2", "mpt", "bloom", "t5-encoder", "apertus", "fnet", "esm",
    "mobilebert", "vit", "deit", "dinov2", "beit", "swin", "clip-vision", "siglip-vision", "convnext", "convnextv2", "poolformer",
)
VISION = ("vit", "deit", "dinov2", "beit", "swin", "clip-vision", "siglip-vision", "convnext", "convnextv2", "poolformer")
#: Mixtures of experts with transformers' default experts: ``torch._grouped_mm`` has no float64 on the CPU.
FLOAT32 = ("mixtral-grouped", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "granitemoe", "phimoe", "llama4")
MODELS = MODELS + FLOAT32


class EmbeddingsToLogits(nn.Module):
    """A text model as a function of its input embeddings: the logits of the last position (causal
    language models), of the classifier, or the summed hidden states (an encoder without a head)."""

    def __init__(self, model: nn.Module, attention_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.attention_mask = attention_mask  # 1 for tokens, 0 for padding, as the tokenizer gives it

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return _logits(self.model(inputs_embeds=embeddings, attention_mask=self.attention_mask))


class IdsToLogits(EmbeddingsToLogits):
    """The same for token ids (``input_ids``), which lrpkit explains through the token embedding."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _logits(self.model(input_ids=ids, attention_mask=self.attention_mask))


def _logits(output: Any) -> torch.Tensor:
    """The logits of the last position or of the classifier, or the summed hidden states."""
    logits = output.logits if hasattr(output, "logits") else output.last_hidden_state.sum(dim=1)
    return logits[:, -1] if logits.dim() == 3 else logits


class PixelsToLogits(nn.Module):
    """A vision model as a function of ``pixel_values``: its logits (or image embedding, or pooled output)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        output = self.model(pixel_values=pixels)
        if hasattr(output, "logits"):
            return output.logits
        return output.image_embeds if hasattr(output, "image_embeds") else output.pooler_output


def module_rules() -> list[tuple[type[nn.Module], rules.Rule | None]]:
    """Rules for modules that the presets' rules by type do not fit.

    An activation module that calls a custom ``torch.autograd.Function`` (BLOOM's GELU): the
    capture does not see inside such a function; its own backward (the GELU's derivative) would
    pass the gradient, which does not conserve relevance, and an ``UncoveredModuleWarning`` would
    name the modules. Mapped to ``Pass``, like every activation; so is Apertus's xIELU, an
    activation module with parameters, built from products that would split its relevance. A
    router that is an
    ``nn.Linear`` returning a tuple (Phi-MoE's, Llama 4's), which no rule can take: no rule, so
    its calls are explained one by one (its routing weights gate the experts' outputs).
    """
    from transformers.activations import XIELUActivation
    from transformers.models.bloom.modeling_bloom import BloomGelu
    from transformers.models.llama4.modeling_llama4 import Llama4Router
    from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter

    return [(BloomGelu, rules.Pass()), (XIELUActivation, rules.Pass()), (PhimoeTopKRouter, None), (Llama4Router, None)]


def composite(name: str, stabilizer: float = 1e-6) -> composites.Composite:
    """``EpsilonGammaBox`` (inputs within +-3) or ``EpsilonPlusFlat`` with ``stabilizer`` everywhere."""
    canonizers = [MergeBatchNorm(), FunctionalCapture(stabilizer=stabilizer)]
    options: dict[str, Any] = {
        "epsilon": stabilizer, "stabilizer": stabilizer, "layer_map": module_rules(), "canonizers": canonizers,
    }
    if name == "EpsilonGammaBox":
        return composites.EpsilonGammaBox(low=-3.0, high=3.0, **options)
    return composites.EpsilonPlusFlat(**options)


def token_relevance(
    model: nn.Module,
    ids: torch.Tensor,
    explainer: composites.Composite | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and one relevance per token (``(batch, tokens)``) of a text model for ``ids``.

    The relevance of the predicted logit is propagated to the token embedding's output and
    summed over each embedding vector (lrpkit does both for integer inputs). ``attention_mask``
    (0 at padding) is passed to the model: a left-padded batch for a causal model gets no
    relevance at its padding.
    """
    output, relevance = Gradient(IdsToLogits(model, attention_mask), explainer or composite("EpsilonGammaBox"))(ids)
    return output, relevance


#: Parameters besides biases that absorb relevance like them, zeroed for the conservation check.
ABSORBERS = (
    "wpe", "position_embedding", "embed_positions", "token_type_embeddings", "cls_token", "mask_token", "class_embedding",
    "relative_position_bias_table", "register_tokens",
)


def without_absorbers(model: nn.Module) -> nn.Module:
    """A copy whose biases, position embeddings and class tokens are zero."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in plain.named_parameters():
            last = name.rsplit(".", 1)[-1]
            if (last == "bias" and parameter.dim() == 1) or any(part in name for part in ABSORBERS):
                parameter.zero_()
    return plain


def build(name: str) -> tuple[nn.Module, torch.Tensor]:
    """The wrapped model (float64, eval mode; float32 for :data:`FLOAT32`) and an input for it."""
    torch.manual_seed(0)
    dtype = torch.float32 if name in FLOAT32 else torch.float64
    model = _small(name).to(dtype).eval()
    generator = torch.Generator().manual_seed(1)
    if name in VISION:
        return PixelsToLogits(model), torch.rand(2, 3, 32, 32, generator=generator, dtype=dtype)
    width = model.get_input_embeddings().weight.shape[1]
    return EmbeddingsToLogits(model), torch.randn(2, 6, width, generator=generator, dtype=dtype)


class Seq2SeqToLogits(nn.Module):
    """An encoder-decoder model (T5, BART) as a function of its encoder and decoder token ids: the
    logits of the last decoder position. Explained with both as inputs, ``(ids, decoder_ids)``,
    each gets its own relevance, and together they sum to the logit."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, decoder_input_ids=decoder_ids).logits[:, -1]


def seq2seq(name: str) -> nn.Module:
    """A small encoder-decoder model, ``"t5"`` or ``"bart"`` (random weights, float64, eval mode)."""
    import transformers as hf

    torch.manual_seed(0)
    layers = {"encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
    factories: dict[str, Callable[[], nn.Module]] = {
        "t5": lambda: hf.T5ForConditionalGeneration(hf.T5Config(
            vocab_size=50, d_model=WIDTH, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0)),
        "bart": lambda: hf.BartForConditionalGeneration(hf.BartConfig(
            vocab_size=50, d_model=WIDTH, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32, **layers)),
    }
    return factories[name]().double().eval()


def seq2seq_conservation(name: str) -> tuple[float, list[str]]:
    """How far the relevance of encoder and decoder tokens together is from the logit (relative),
    and the warnings, with biases and position embeddings zero and stabilisers of 1e-12."""
    import warnings

    model = Seq2SeqToLogits(without_absorbers(seq2seq(name)))
    generator = torch.Generator().manual_seed(1)
    ids, decoder_ids = torch.randint(3, 50, (2, 6), generator=generator), torch.randint(3, 50, (2, 4), generator=generator)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        output, (encoder, decoder) = Gradient(model, composite("EpsilonPlusFlat", 1e-12))((ids, decoder_ids))
    logit = output.max(1).values
    error = float(((encoder.sum(1) + decoder.sum(1) - logit).abs() / logit.abs()).max())
    return error, [str(warning.message) for warning in caught]


def main(names: Sequence[str]) -> dict[str, dict[str, dict[str, object]]]:
    """Check every model in ``names``; print one line per model and composite."""
    results: dict[str, dict[str, dict[str, object]]] = {}
    for name in names:
        model, x = build(name)
        plain = without_absorbers(model)
        results[name] = {
            preset: check(model, x, lambda stabilizer: composite(preset, stabilizer), plain)
            for preset in ("EpsilonGammaBox", "EpsilonPlusFlat")
        }
        for preset, result in results[name].items():
            print(f"{name:12s} {preset:16s} " + ", ".join(f"{key}: {value}" for key, value in result.items()))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(MODELS), help=f"architectures (default: {', '.join(MODELS)})")
    main(parser.parse_args().names)
