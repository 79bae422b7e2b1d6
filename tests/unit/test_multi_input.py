"""Models with several inputs: ``attributor((a, b))`` runs ``model(a, b)`` and returns one relevance per input.

References: the same attributor on a one-input view of the model with the other input held
fixed (Occlusion, and every gradient without a composite, equal it exactly; LRP relevance too,
since no rule depends on which inputs require a gradient), conservation over all inputs
together, and the token-id path of ``test_tokens.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import lrpkit
from lrpkit import composites
from lrpkit.attribution import Gradient, GradientXInput, IntegratedGradients, Occlusion, Sensitivity, SmoothGrad


class ImageAndTable(nn.Module):
    """A convolutional branch for an image, a dense one for tabular features, one head."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=bias), nn.ReLU(), nn.Flatten())
        self.table = nn.Sequential(nn.Linear(4, 5, bias=bias), nn.ReLU())
        self.head = nn.Linear(3 * 5 * 5 + 5, 3, bias=bias)

    def forward(self, image: Tensor, table: Tensor) -> Tensor:
        return self.head(torch.cat([self.image(image), self.table(table)], dim=1))


class Fixed(nn.Module):
    """``model`` as a function of input ``which`` alone, the other held at ``other``."""

    def __init__(self, model: nn.Module, which: int, other: Tensor) -> None:
        super().__init__()
        self.model, self.which, self.other = model, which, other

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, self.other) if self.which == 0 else self.model(self.other, x)


def _model(bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return ImageAndTable(bias).double().eval()


def _inputs(rows: int = 3) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.rand(rows, 2, 5, 5, generator=generator, dtype=torch.float64),
        torch.randn(rows, 4, generator=generator, dtype=torch.float64),
    )


@pytest.mark.parametrize("composite", [None, "EpsilonPlus", "EpsilonPlusFlat", "EpsilonAlpha2Beta1"])
def test_gradient_gives_one_relevance_per_input(composite: str | None) -> None:
    model, (image, table) = _model(), _inputs()
    make = (lambda: None) if composite is None else getattr(composites, composite)
    output, relevance = Gradient(model, make())((image, table), target=2)
    assert isinstance(relevance, tuple) and [r.shape for r in relevance] == [image.shape, table.shape]
    for which, (alone, other) in enumerate([(image, table), (table, image)]):
        expected_output, expected = Gradient(Fixed(model, which, other), make())(alone, target=2)
        torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
        torch.testing.assert_close(relevance[which], expected, rtol=1e-12, atol=1e-15)


def test_relevance_is_conserved_over_all_inputs() -> None:
    model, inputs = _model(), _inputs()
    output, (image, table) = Gradient(model, composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12))(inputs, target=0)
    total = image.flatten(1).sum(1) + table.sum(1)
    torch.testing.assert_close(total, output[:, 0], rtol=1e-9, atol=1e-12)
    assert image.abs().sum() > 0 and table.abs().sum() > 0
    _, (explained, _) = lrpkit.explain(model, list(inputs), "epsilon_plus")  # a list works too
    assert explained.shape == inputs[0].shape


@pytest.mark.parametrize("attributor", [GradientXInput, Sensitivity])
def test_score_gradients(attributor: type) -> None:
    model, (image, table) = _model(True), _inputs()
    result = attributor(model)((image, table), target=1)
    assert [r.shape for r in result.relevance] == [image.shape, table.shape]
    for which, (alone, other) in enumerate([(image, table), (table, image)]):
        expected = attributor(Fixed(model, which, other))(alone, target=1)
        torch.testing.assert_close(result.relevance[which], expected.relevance, rtol=1e-12, atol=1e-15)


def test_smoothgrad_without_noise_is_gradient_and_noise_reaches_every_input() -> None:
    model, inputs = _model(True), _inputs()
    plain = Gradient(model, composites.EpsilonPlus())(inputs, target=1)
    smooth = SmoothGrad(model, composites.EpsilonPlus(), noise=0.0, samples=2, batch_size=4)(inputs, target=1)
    for got, expected in zip(smooth.relevance, plain.relevance):
        torch.testing.assert_close(got, expected)
    noisy = SmoothGrad(model, noise=0.3, samples=4, seed=0, batch_size=5)(inputs, target=1)
    for got, expected in zip(noisy.relevance, Gradient(model)(inputs, target=1).relevance):
        assert not torch.allclose(got, expected)  # each input got its own noise
    again = SmoothGrad(model, noise=0.3, samples=4, seed=0, batch_size=3)(inputs, target=1)
    for got, expected in zip(again.relevance, noisy.relevance):
        torch.testing.assert_close(got, expected)  # batch_size does not change the result


def test_integrated_gradients_is_complete_over_all_inputs() -> None:
    model, (image, table) = _model(True), _inputs()
    baselines = (0.5, torch.full((4,), -1.0, dtype=torch.float64))
    result = IntegratedGradients(model, baseline=baselines, steps=256, batch_size=64)((image, table), target=0)
    with torch.no_grad():
        gap = model(image, table)[:, 0] - model(torch.full_like(image, 0.5), torch.full_like(table, -1.0))[:, 0]
    total = result.relevance[0].flatten(1).sum(1) + result.relevance[1].sum(1)
    torch.testing.assert_close(total, gap, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="one tensor for a model with 2 inputs"):
        IntegratedGradients(model, baseline=torch.zeros(4))((image, table))
    with pytest.raises(ValueError, match="has 3 entries for a model with 2"):
        IntegratedGradients(model, baseline=(0.0, 0.0, 0.0))((image, table))


def test_occlusion_covers_each_input_in_turn() -> None:
    model, (image, table) = _model(True), _inputs(2)
    result = Occlusion(model, window=[(2, 2), 1], stride=[(1, 1), 1], fill=(0.5, 0.0))((image, table), target=2)
    for row in range(2):  # one sample at a time: Fixed holds one row of the other input
        one = slice(row, row + 1)
        alone_image = Occlusion(Fixed(model, 0, table[one]), window=(2, 2), stride=1, fill=0.5, batch_size=1)(image[one], target=2)
        alone_table = Occlusion(Fixed(model, 1, image[one]), window=1, fill=0.0, batch_size=1)(table[one], target=2)
        torch.testing.assert_close(result.relevance[0][one], alone_image.relevance)
        torch.testing.assert_close(result.relevance[1][one], alone_table.relevance)
    shared = Occlusion(model, window=1)((image, table), target=2)  # an int: every input
    assert [r.shape for r in shared.relevance] == [image.shape, table.shape]
    with pytest.raises(ValueError, match="one window per input"):
        Occlusion(model, window=[(2, 2), 1, 1])((image, table))


class TextAndImage(nn.Module):
    """Token ids through an embedding, next to an image."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 3)
        self.image = nn.Sequential(nn.Conv2d(2, 2, 3, bias=False), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 3 + 2 * 3 * 3, 2, bias=False)

    def forward(self, ids: Tensor, image: Tensor) -> Tensor:
        return self.rest(self.embedding(ids), image)

    def rest(self, vectors: Tensor, image: Tensor) -> Tensor:
        return self.head(torch.cat([vectors.flatten(1), self.image(image)], dim=1))


class FromVectors(nn.Module):
    def __init__(self, model: TextAndImage) -> None:
        super().__init__()
        self.model = model

    def forward(self, vectors: Tensor, image: Tensor) -> Tensor:
        return self.model.rest(vectors, image)


def test_token_ids_next_to_an_image() -> None:
    torch.manual_seed(0)
    model = TextAndImage().double().eval()
    ids, image = torch.randint(0, 10, (2, 4)), torch.rand(2, 2, 5, 5, dtype=torch.float64)
    lrp = composites.EpsilonPlus(epsilon=1e-12, stabilizer=1e-12)
    output, (tokens, pixels) = Gradient(model, lrp)((ids, image), target=1)
    vectors = model.embedding(ids).detach()
    _, (expected_tokens, expected_pixels) = Gradient(FromVectors(model), lrp)((vectors, image), target=1)
    assert tokens.shape == ids.shape
    torch.testing.assert_close(tokens, expected_tokens.sum(-1), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(pixels, expected_pixels, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(tokens.sum(1) + pixels.flatten(1).sum(1), output[:, 1], rtol=1e-9, atol=1e-12)
    pad = torch.zeros(4, dtype=torch.long)
    integrated = IntegratedGradients(model, baseline=(pad, 0.0), steps=4)((ids, image), target=1)
    assert integrated.relevance[0].shape == ids.shape
    occluded = Occlusion(model, window=1, fill=(0, 0.0))((ids, image), target=1)
    assert occluded.relevance[0].shape == ids.shape


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        ((), ValueError, "empty tuple"),
        ((torch.rand(2, 2, 5, 5), torch.rand(3, 4)), ValueError, r"first dimensions differ \(\(2, 2, 5, 5\), \(3, 4\)\)"),
        ((torch.rand(2, 2, 5, 5), torch.ones(2, 4, dtype=torch.bool)), TypeError, "input 1: the input must be a floating-point"),
        ((torch.rand(2, 2, 5, 5), [1.0, 2.0]), TypeError, "input 1: the input must be a torch.Tensor"),
    ],
)
def test_clear_errors(inputs: tuple, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Gradient(_model().float())(inputs)


def test_one_input_in_a_tuple_gives_a_tuple() -> None:
    model = nn.Linear(3, 2)
    x = torch.rand(2, 3)
    result = Gradient(model, composites.EpsilonPlus())((x,))
    assert isinstance(result.relevance, tuple) and len(result.relevance) == 1
    torch.testing.assert_close(result.relevance[0], Gradient(model, composites.EpsilonPlus())(x).relevance)
    with pytest.raises(ValueError, match="several inputs"):
        lrpkit.explain(_model(), _inputs(), "epsilon_gamma_box")


def test_describe_with_several_inputs() -> None:
    model, inputs = _model(), _inputs()
    table = lrpkit.describe(model, inputs, "epsilon_plus")
    expected = Gradient(model, composites.EpsilonPlus())(inputs).relevance
    for got, want in zip(table.relevance, expected):
        torch.testing.assert_close(got, want)
    assert [row.name for row in table.rows][:3] == ["", "image", "image.0"]


class Masked(nn.Module):
    """A masked mean over positions, as a text model's attention mask is used."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 3)
        self.head = nn.Linear(3, 2, bias=False)

    def forward(self, ids: Tensor, mask: Tensor | None = None, scale: float = 1.0) -> Tensor:
        vectors = self.embedding(ids) * mask.unsqueeze(-1)
        return self.head(vectors.sum(1) * scale)


class BoundMask(nn.Module):
    def __init__(self, model: Masked, mask: Tensor, scale: float) -> None:
        super().__init__()
        self.model, self.mask, self.scale = model, mask, scale

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(ids, mask=self.mask, scale=self.scale)


@pytest.mark.parametrize("attributor, options", [(Gradient, {}), (SmoothGrad, {"noise": 0.2, "samples": 3, "seed": 1, "batch_size": 2}),
                                                 (IntegratedGradients, {"steps": 3, "batch_size": 2}), (Occlusion, {"window": 1, "batch_size": 2})])
def test_model_kwargs_go_to_every_call_row_by_row(attributor: type, options: dict) -> None:
    torch.manual_seed(0)
    model = Masked().double().eval()
    ids = torch.randint(0, 10, (3, 4))
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float64)
    lrp = None if attributor is Occlusion else composites.EpsilonPlus()
    result = attributor(model, lrp, **options)(ids, target=1, model_kwargs={"mask": mask, "scale": 2.0})
    for row in range(3):  # the same sample alone, its mask bound in a module
        one = slice(row, row + 1)
        alone = attributor(BoundMask(model, mask[one], 2.0), lrp, **options)(ids[one], target=1)
        torch.testing.assert_close(result.relevance[one], alone.relevance)
        torch.testing.assert_close(result.output[one], alone.output)
    if attributor is not Occlusion:
        assert torch.all(result.relevance[mask == 0] == 0)
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        attributor(model, lrp, **options)(ids, model_kwargs=[mask])


def test_explain_takes_an_output_selector_and_model_kwargs() -> None:
    torch.manual_seed(0)
    model = Masked().double().eval()
    ids, mask = torch.randint(0, 10, (2, 4)), torch.ones(2, 4, dtype=torch.float64)

    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
            return {"logits": self.inner(ids, mask=mask)}

    result = lrpkit.explain(Dict(), ids, "epsilon_plus", target=0, model_kwargs={"mask": mask}, output="logits")
    expected = Gradient(BoundMask(model, mask, 1.0), composites.EpsilonPlus())(ids, target=0)
    torch.testing.assert_close(result.relevance, expected.relevance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_several_inputs_on_cuda_match_the_cpu() -> None:
    model, inputs = _model(True), _inputs()
    for attributor in (Gradient(model, composites.EpsilonPlus()), IntegratedGradients(model, baseline=(0.5, 0.0), steps=4)):
        on_cpu = attributor(inputs, target=1).relevance
        model.cuda()
        on_gpu = attributor(tuple(part.cuda() for part in inputs), target=1).relevance
        model.cpu()
        for got, want in zip(on_gpu, on_cpu):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-9, atol=1e-12)


def test_describe_takes_an_output_selector() -> None:
    class Dict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"logits": self.linear(x)}

    model, x = Dict().eval(), torch.rand(2, 3)
    table = lrpkit.describe(model, x, "epsilon_plus", output="logits")
    torch.testing.assert_close(table.relevance, Gradient(model, composites.EpsilonPlus(), output="logits")(x).relevance)


def test_describe_takes_model_kwargs() -> None:
    """As ``explain``: the keyword arguments reach the model call, unexplained."""
    torch.manual_seed(0)
    model = Masked().double().eval()
    ids, mask = torch.randint(0, 10, (2, 4)), torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    table = lrpkit.describe(model, ids, "epsilon_plus", target=0, model_kwargs={"mask": mask})
    expected = lrpkit.explain(model, ids, "epsilon_plus", target=0, model_kwargs={"mask": mask})
    torch.testing.assert_close(table.relevance, expected.relevance)
    assert not table.relevance[mask == 0].any()
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        lrpkit.describe(model, ids, "epsilon_plus", model_kwargs=[mask])


def test_describe_lists_each_merged_batchnorm_after_its_layer() -> None:
    """A merged BatchNorm is out of the module tree during the explanation; its row says where it went."""
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2)
    ).eval()
    rows = list(lrpkit.describe(model, torch.rand(2, 1, 4, 4), "epsilon_plus"))
    assert [row.name for row in rows][:7] == ["", "0", "1", "2", "3", "3.max_pool2d", "4"]
    conv, merged, lone = rows[1], rows[2], rows[6]
    assert (merged.kind, merged.rule) == ("BatchNorm2d", "merged into '0'")
    assert (merged.shape, merged.relevance) == (conv.shape, conv.relevance)
    assert lone.rule == "Pass()"  # after a pooling: nothing to merge into
