"""Token-id inputs: attributors explain the embedding lookup's vectors, one relevance per token.

The reference for every attributor is the same attributor run on the embedding vectors by a
model that starts after the lookup (what a user had to write before), summed over the
embedding dimension.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import lrpkit
from lrpkit import composites
from lrpkit.attribution import Gradient, GradientXInput, IntegratedGradients, Occlusion, Sensitivity, SmoothGrad

VOCAB, WIDTH, TOKENS = 12, 5, 6


class BagText(nn.Module):
    """Embedding, flatten, linear: relevance is exactly conserved without biases."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(TOKENS * WIDTH, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))

    def forward(self, ids: Tensor) -> Tensor:
        return self.rest(self.embedding(ids))

    def rest(self, vectors: Tensor) -> Tensor:
        return self.head(vectors)


class LstmText(nn.Module):
    """An LSTM classifier; ``seq_first`` looks up ``ids.t()`` (a transposed view) as such models do."""

    def __init__(self, seq_first: bool = False) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.lstm = nn.LSTM(WIDTH, 4, batch_first=not seq_first)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        vectors = self.embedding(ids.t() if self.seq_first else ids)
        return self.rest(vectors.transpose(0, 1) if self.seq_first else vectors)

    def rest(self, vectors: Tensor) -> Tensor:
        states, _ = self.lstm(vectors.transpose(0, 1) if self.seq_first else vectors)
        return self.head(states[-1] if self.seq_first else states[:, -1])


class SkipsFirst(BagText):
    """Looks up ``ids[:, 1:]`` (a sliced view): the first token gets no relevance."""

    def __init__(self) -> None:
        super().__init__()
        self.head[1] = nn.Linear((TOKENS - 1) * WIDTH, 8, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embedding(ids[:, 1:]))

    def rest(self, vectors: Tensor) -> Tensor:
        return self.head(vectors[:, 1:])


class FromVectors(nn.Module):
    """The model after its lookup, on the vectors in the ids' layout."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, vectors: Tensor) -> Tensor:
        return self.model.rest(vectors)


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = {"bag": BagText, "lstm": LstmText, "seq_first": lambda: LstmText(seq_first=True), "skips": SkipsFirst}[kind]()
    return model.double().eval()


def _ids(rows: int = 3) -> Tensor:
    return torch.randint(0, VOCAB, (rows, TOKENS), generator=torch.Generator().manual_seed(1))


def _vectors(model: nn.Module, ids: Tensor) -> Tensor:
    return model.embedding(ids).detach()


@pytest.mark.parametrize("kind", ["bag", "lstm", "seq_first", "skips"])
@pytest.mark.parametrize("composite", [None, "EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1"])
def test_gradient_explains_the_lookup(kind: str, composite: str | None) -> None:
    model, ids = _model(kind), _ids()
    make = (lambda: None) if composite is None else getattr(composites, composite)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UncoveredModuleWarning for the embedding
        output, relevance = Gradient(model, make())(ids, target=1)
    expected_output, expected = Gradient(FromVectors(model), make())(_vectors(model, ids), target=1)
    assert relevance.shape == ids.shape and relevance.dtype == torch.float64
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    torch.testing.assert_close(relevance, expected.sum(-1), rtol=1e-12, atol=1e-14)
    assert all(not module._forward_hooks for module in model.modules())
    if kind == "skips":
        assert torch.all(relevance[:, 0] == 0)


def test_conserved_and_batch_independent() -> None:
    model, ids = _model("bag"), _ids()
    output, relevance = Gradient(model, composites.EpsilonPlus(epsilon=1e-12))(ids, target=2)
    torch.testing.assert_close(relevance.sum(1), output[:, 2], rtol=1e-9, atol=1e-12)
    _, alone = Gradient(model, composites.EpsilonPlus(epsilon=1e-12))(ids[1:2], target=2)
    torch.testing.assert_close(alone, relevance[1:2], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "attributor, options",
    [
        (GradientXInput, {}),
        (Sensitivity, {}),
        (SmoothGrad, {"noise": 0.2, "samples": 3, "seed": 0, "batch_size": 2}),
        (IntegratedGradients, {"steps": 4, "baseline": 0.1, "batch_size": 5}),
    ],
)
def test_batched_and_gradient_attributors(attributor: type, options: dict) -> None:
    model, ids = _model("lstm"), _ids()
    result = attributor(model, composites.EpsilonPlus(), **options)(ids, target=0)
    expected = attributor(FromVectors(model), composites.EpsilonPlus(), **options)(_vectors(model, ids), target=0)
    torch.testing.assert_close(result.output, expected.output, rtol=0, atol=0)
    torch.testing.assert_close(result.relevance, expected.relevance.sum(-1))


def test_integrated_gradients_from_baseline_ids() -> None:
    model, ids = _model("bag"), _ids()
    pad = torch.zeros(TOKENS, dtype=torch.long)
    result = IntegratedGradients(model, baseline=pad, steps=8)(ids, target=1)
    baseline = _vectors(model, pad.expand_as(ids))
    expected = IntegratedGradients(FromVectors(model), baseline=baseline, steps=8)(_vectors(model, ids), target=1)
    torch.testing.assert_close(result.relevance, expected.relevance.sum(-1))
    # completeness: score(ids) - score(pad ids), up to the quadrature (a piecewise linear model)
    gap = model(ids)[:, 1] - model(pad.expand_as(ids))[:, 1]
    torch.testing.assert_close(result.relevance.sum(1), gap.detach(), rtol=0.05, atol=0.05)


def test_occlusion_replaces_tokens_by_the_fill_id() -> None:
    model, ids = _model("lstm"), _ids(2)
    result = Occlusion(model, window=1, fill=7)(ids, target=2)
    with torch.no_grad():
        clean = model(ids)[:, 2]
        for position in range(TOKENS):
            covered = ids.clone()
            covered[:, position] = 7
            torch.testing.assert_close(result.relevance[:, position], clean - model(covered)[:, 2])
    with pytest.raises(ValueError, match="fill must be a token id"):
        Occlusion(model, window=1, fill=0.5)(ids)


def test_record_names_the_models_calls_only() -> None:
    model, ids = _model("bag"), _ids()
    result = Gradient(model, composites.EpsilonPlus())(ids, record=True)
    expected = Gradient(FromVectors(model), composites.EpsilonPlus())(_vectors(model, ids), record=True)
    assert list(result.intermediate) == [name.removeprefix("model.") for name in expected.intermediate]
    for name, relevance in result.intermediate.items():
        torch.testing.assert_close(relevance, expected.intermediate["model." + name])
    layer = Gradient(model, composites.EpsilonPlus())(ids, layer="head.2", target=0)
    assert layer.relevance.shape == ids.shape


def test_explain_and_presets() -> None:
    model, ids = _model("bag"), _ids()
    output, relevance = lrpkit.explain(model, ids)
    assert relevance.shape == ids.shape
    with pytest.raises(ValueError, match="token ids"):
        lrpkit.explain(model, ids, "epsilon_gamma_box")
    table = lrpkit.describe(model, ids, "epsilon_plus")
    torch.testing.assert_close(table.relevance, Gradient(model, composites.EpsilonPlus())(ids).relevance)
    assert [row.name for row in table.rows][:2] == ["", "embedding"]
    embedding = table.rows[1]
    assert embedding.rule == "lookup" and embedding.relevance == pytest.approx(float(table.relevance.sum()), rel=1e-6)


class Twice(BagText):
    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embedding(ids) + self.embedding(ids))


class Converts(BagText):
    """Moves its ids before the lookup: converted, transposed twice, made contiguous, cloned."""

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embedding(ids.long().t().contiguous().t().clone()))


class Shifts(BagText):
    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.embedding(ids % VOCAB))


def test_ids_moved_before_the_lookup_are_followed() -> None:
    model, ids = _model("bag"), _ids()
    converts = Converts().double().eval()
    converts.load_state_dict(model.state_dict())
    expected = Gradient(model, composites.EpsilonPlus())(ids, target=1).relevance
    torch.testing.assert_close(Gradient(converts, composites.EpsilonPlus())(ids.int(), target=1).relevance, expected)


class RawTable(BagText):
    """The same model reading its table without ``nn.Embedding``: a parameter of its own or the embedding's weight."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.table = nn.Parameter(torch.zeros(VOCAB, WIDTH))
        self.register_buffer("frozen", torch.zeros(VOCAB, WIDTH))

    def forward(self, ids: Tensor) -> Tensor:
        if self.how == "index":
            vectors = self.table[ids]
        elif self.how == "buffer":
            vectors = self.frozen[ids]
        elif self.how == "weight":
            vectors = self.embedding.weight[ids]
        elif self.how == "reordered":  # ids picked by an index tensor (a copy, followed), then the table
            vectors = self.table[ids[:, torch.arange(ids.shape[1])]]
        elif self.how == "index_select":
            vectors = self.table.index_select(0, ids.reshape(-1)).view(*ids.shape, WIDTH)
        else:
            vectors = torch.nn.functional.embedding(ids, self.table)
        return self.head(vectors)


@pytest.mark.parametrize("how", ["index", "buffer", "weight", "reordered", "index_select", "functional"])
def test_a_table_read_without_an_embedding_module(how: str) -> None:
    """``table[ids]``, ``table.index_select(0, ids)`` and ``F.embedding(ids, table)`` on a parameter or
    buffer of the model are lookups like ``nn.Embedding``'s: the same relevance per token."""
    model, ids = _model("bag"), _ids()
    raw = RawTable(how).double().eval()
    raw.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        raw.table.copy_(model.embedding.weight)
        raw.frozen.copy_(model.embedding.weight)
    expected = Gradient(model, composites.EpsilonPlus())(ids, target=1)
    result = Gradient(raw, composites.EpsilonPlus())(ids, target=1)
    torch.testing.assert_close(result.output, expected.output)
    torch.testing.assert_close(result.relevance, expected.relevance)


class NoLookup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(TOKENS, 2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(ids.double())


@pytest.mark.parametrize(
    "model, ids, match",
    [
        (Twice(), _ids(), "looked up more than once .*'embedding'"),
        (Shifts(), _ids(), r"computes other ids from them first \(ids \+ 1"),
        (NoLookup(), _ids(), "has no nn.Embedding .* floating-point tensor"),
    ],
)
def test_clear_errors_and_nothing_left_behind(model: nn.Module, ids: Tensor, match: str) -> None:
    model = model.double().eval()
    with pytest.raises((ValueError, TypeError), match=match):
        Gradient(model, composites.EpsilonPlus())(ids)
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


def test_boolean_input_refused() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        Gradient(_model("bag"))(torch.ones(1, TOKENS, dtype=torch.bool))


class BagModel(nn.Module):
    """``nn.EmbeddingBag`` and a linear head, as PyTorch's text-classification tutorial builds it."""

    def __init__(self, mode: str, padding_idx: int | None) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, WIDTH, mode=mode, padding_idx=padding_idx)
        self.head = nn.Linear(WIDTH, 3, bias=False)

    def forward(self, ids: Tensor, offsets: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        return self.head(self.bag(ids, offsets, per_sample_weights=weights))


class BagWrittenOut(nn.Module):
    """The same bag written out on the vectors of ``ids``: a masked, weighted sum or mean."""

    def __init__(self, model: BagModel, ids: Tensor, weights: Tensor | None) -> None:
        super().__init__()
        self.model, self.ids, self.weights = model, ids, weights

    def forward(self, vectors: Tensor) -> Tensor:
        pad = self.model.bag.padding_idx
        kept = (self.ids != pad).double() if pad is not None else torch.ones_like(self.ids, dtype=torch.double)
        factors = kept if self.weights is None else kept * self.weights
        total = (vectors * factors.unsqueeze(-1)).sum(1)
        if self.model.bag.mode == "mean":
            total = total / kept.sum(1, keepdim=True).clamp(min=1)
        return self.model.head(total)


class Bound(nn.Module):
    """The bag model on flat ids with fixed offsets (and weights), as one-input attributors need."""

    def __init__(self, model: BagModel, offsets: Tensor | None = None, weights: Tensor | None = None) -> None:
        super().__init__()
        self.model, self.offsets, self.weights = model, offsets, weights

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids, self.offsets, self.weights)


@pytest.mark.parametrize("mode, padding_idx, weighted", [("sum", None, False), ("sum", 0, True), ("mean", None, False), ("mean", 0, False)])
def test_embedding_bag(mode: str, padding_idx: int | None, weighted: bool) -> None:
    torch.manual_seed(0)
    model, ids = BagModel(mode, padding_idx).double().eval(), _ids()
    ids[1, 2] = ids[2, :] = 0  # padding, and a bag of padding only
    if padding_idx is not None:
        with torch.no_grad():
            model.bag.weight[padding_idx] = 1.0  # (trained or loaded, not zero): the bag still leaves it out
    weights = torch.rand(ids.shape, dtype=torch.float64) if weighted else None
    lrp = composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, relevance = Gradient(Bound(model, weights=weights), lrp)(ids)
    vectors = nn.functional.embedding(ids, model.bag.weight).detach()
    expected_output, expected = Gradient(BagWrittenOut(model, ids, weights), lrp)(vectors)
    torch.testing.assert_close(output, expected_output, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(relevance, expected.sum(-1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(relevance.sum(1), output.max(1).values, rtol=1e-9, atol=1e-12)
    if padding_idx is not None:
        assert torch.all(relevance[ids == padding_idx] == 0)
    # the same ids flat, with offsets: one relevance per id
    flat_weights = None if weights is None else weights.reshape(-1)
    offsets = torch.arange(0, ids.numel(), TOKENS)
    _, flat = Gradient(Bound(model, offsets, flat_weights), lrp)(ids.reshape(-1))
    torch.testing.assert_close(flat, relevance.reshape(-1), rtol=1e-12, atol=1e-14)


def test_embedding_bag_refusals() -> None:
    ids = _ids()
    with pytest.raises(ValueError, match="mode='max'"):
        Gradient(Bound(BagModel("max", None).double().eval()), composites.EpsilonPlus())(ids)
    flat = Bound(BagModel("sum", None).double().eval(), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="SmoothGrad explains token ids of shape .batch, tokens"):
        SmoothGrad(flat, composites.EpsilonPlus())(ids.reshape(-1))


class PackedText(nn.Module):
    """The usual text classifier for padded batches: embedding, packed bidirectional LSTM, head on h_n."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        self.lstm = nn.LSTM(WIDTH, 4, batch_first=True, bidirectional=True, bias=False)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, ids: Tensor, lengths: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return self.head(torch.cat([h[-2], h[-1]], dim=1))


def test_padded_batch_with_lengths_in_model_kwargs() -> None:
    """Token ids, lengths as ``model_kwargs``, a packed LSTM: conserved, nothing on the padding,
    and each sentence's relevance is what it gets alone, unpadded."""
    torch.manual_seed(0)
    model = PackedText().double().eval()
    ids, lengths = _ids(), torch.tensor([6, 2, 4])
    for row, length in enumerate(lengths.tolist()):
        ids[row, length:] = 0
    lrp = composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, relevance = Gradient(model, lrp)(ids, target=0, model_kwargs={"lengths": lengths})
    torch.testing.assert_close(relevance.sum(1), output[:, 0], rtol=1e-9, atol=1e-12)
    assert torch.all(relevance[ids == 0] == 0)
    for row, length in enumerate(lengths.tolist()):
        alone = Gradient(model, lrp)(ids[row : row + 1, :length], target=0, model_kwargs={"lengths": lengths[row : row + 1]})
        torch.testing.assert_close(relevance[row, :length], alone.relevance[0], rtol=1e-9, atol=1e-12)
    smooth = SmoothGrad(model, lrp, noise=0.0, samples=2, batch_size=2)(ids, target=0, model_kwargs={"lengths": lengths})
    torch.testing.assert_close(smooth.relevance, relevance)


class Positions(nn.Embedding):
    """BART's learned positions: called with the ids, looks up positions computed from their shape."""

    def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(torch.arange(ids.shape[1], device=ids.device).expand_as(ids))


class Scaled(nn.Embedding):
    """Gemma's scaled word embedding: the lookup times a constant."""

    def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(ids) * 3.0


class Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(WIDTH))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


class Seq2Seq(nn.Module):
    """Word and position embeddings that both take the ids, and a branch on a constant (a decoder's input)."""

    def __init__(self) -> None:
        super().__init__()
        self.words = Scaled(VOCAB, WIDTH)
        self.positions = Positions(TOKENS, WIDTH)
        self.constant_norm = Scale()
        self.side = nn.Linear(WIDTH, WIDTH, bias=False)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(TOKENS * WIDTH, 3, bias=False))

    def forward(self, ids: Tensor, prefix: Tensor) -> Tensor:
        return self.rest(self.words(ids), ids, prefix)

    def rest(self, words: Tensor, ids: Tensor, prefix: Tensor) -> Tensor:
        return self.head(words + self.positions(ids) + self.side(self.constant_norm(prefix)))


def test_the_lookup_is_the_embedding_call_that_reads_the_ids() -> None:
    """A module that takes the ids but looks up positions is left alone; a subclass's scale stays
    part of the model; a module that only sees constants is not named in a warning."""
    torch.manual_seed(0)
    model, ids = Seq2Seq().double().eval(), _ids()
    prefix = torch.rand(1, TOKENS, WIDTH, dtype=torch.float64)
    lrp = composites.EpsilonPlus()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, relevance = Gradient(model, lrp)(ids, target=1, model_kwargs={"prefix": prefix})

    class FromLookup(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, vectors: Tensor) -> Tensor:
            return self.model.rest(vectors * 3.0, ids, prefix)

    vectors = nn.functional.embedding(ids, model.words.weight).detach()
    expected_output, expected = Gradient(FromLookup(), lrp)(vectors, target=1)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    torch.testing.assert_close(relevance, expected.sum(-1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "tokens, expected",
    [
        (["[CLS]", "the", "un", "##believ", "##able", "film", "[SEP]"], ["[CLS]", "the", "unbelievable", "film", "[SEP]"]),
        (["<s>", "The", "\u0120un", "believ", "able", "\u0120film"], ["<s>", "The", "unbelievable", "film"]),
        (["\u2581The", "\u2581un", "believ", "able", "\u2581film", "</s>"], ["The", "unbelievable", "film", "</s>"]),
        (["the", "film"], ["the", "film"]),
    ],
)
def test_words_join_subword_tokens_and_add_their_relevance(tokens: list[str], expected: list[str]) -> None:
    from lrpkit.tokens import words

    relevance = torch.arange(len(tokens), dtype=torch.float64)
    joined, totals = words(tokens, relevance)
    assert joined == expected
    assert totals.sum() == relevance.sum() and totals.dtype == torch.float64
    merged = next(index for index, word in enumerate(joined) if word == "unbelievable") if "unbelievable" in joined else None
    if merged is not None:
        start = next(index for index, token in enumerate(tokens) if token.lstrip("\u0120\u2581") == "un")
        assert totals[merged] == relevance[start : start + 3].sum()
    with pytest.raises(ValueError, match="one value per token"):
        words(tokens, relevance[:-1])


class FrozenLookup(BagText):
    """Looks its ids up under ``torch.no_grad()`` (a frozen, pretrained table)."""

    def forward(self, ids: Tensor) -> Tensor:
        with torch.no_grad():
            vectors = self.embedding(ids)
        return self.rest(vectors)


def test_a_lookup_under_no_grad_still_passes_relevance() -> None:
    model, ids = _model("bag"), _ids()
    frozen = FrozenLookup().double().eval()
    frozen.load_state_dict(model.state_dict())
    expected = Gradient(model, composites.EpsilonPlus())(ids, target=1).relevance
    torch.testing.assert_close(Gradient(frozen, composites.EpsilonPlus())(ids, target=1).relevance, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attributor, options", [(Gradient, {}), (SmoothGrad, {"noise": 0.1, "samples": 3, "seed": 0}),
                                                 (IntegratedGradients, {"steps": 4}), (Occlusion, {"window": 1, "fill": 0})])
def test_token_ids_on_cuda_match_the_cpu(attributor: type, options: dict) -> None:
    """Token ids, lengths in model_kwargs and a packed LSTM on the GPU: the CPU's relevance."""
    torch.manual_seed(0)
    model = PackedText().double().eval()
    ids, lengths = _ids(), torch.tensor([6, 2, 4])
    for row, length in enumerate(lengths.tolist()):
        ids[row, length:] = 0
    lrp = None if attributor is Occlusion else composites.EpsilonPlus()
    on_cpu = attributor(model, lrp, **options)(ids, target=0, model_kwargs={"lengths": lengths})
    on_gpu = attributor(model.cuda(), lrp, **options)(ids.cuda(), target=0, model_kwargs={"lengths": lengths})
    assert on_gpu.relevance.device.type == "cuda"
    torch.testing.assert_close(on_gpu.relevance.cpu(), on_cpu.relevance, rtol=1e-9, atol=1e-12)
