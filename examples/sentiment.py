"""Relevance per token for a text classifier trained in seconds: which words decide the sentiment?

Nothing is downloaded: the sentences come from a toy language of 24 words, four of them
carrying sentiment ("good", "great" against "bad", "awful") and the rest filler. A sentence's
label is positive when it holds more positive than negative words. Two classifiers learn the
task in a few seconds on a CPU:

- ``lstm``: ``nn.Embedding`` -> ``nn.LSTM`` -> ``nn.Linear`` on the last state (explained as in
  Arras et al. 2017, with the recurrent layer written out per step inside the context);
- ``bag``: ``nn.EmbeddingBag`` (mean) -> ``nn.Linear``, the model of PyTorch's text
  classification tutorial.

Each is explained from its token ids: ``lrpkit.explain(model, ids, "epsilon_plus")`` looks
the ids up through the model's embedding and gives one relevance per token. The script reports
the accuracy on fresh sentences, how often the token with the largest relevance for the
predicted class is a sentiment word of that class, and how far the tokens' relevances sum from
the logit (the layers have no biases, which would absorb relevance), and the area over the
word-deletion curve (AOPC: words removed most relevant first, replaced by "the") next to that of
a random order, and prints one sentence with its tokens' relevances. With ``--html PATH`` it writes a page of test sentences for each
model, every word coloured by its relevance (``lrpkit.image.text_heatmap``: red for the
predicted class, blue against it).

Run it as ``python examples/sentiment.py --html sentiment.html``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from collections.abc import Sequence

import torch
from torch import nn

import lrpkit
from lrpkit import image
from lrpkit.evaluation import aopc, perturbation_curve

POSITIVE = ("good", "great")
NEGATIVE = ("bad", "awful")
FILLER = (
    "the", "a", "film", "was", "plot", "and", "it", "very", "actors", "music", "story", "but",
    "quite", "this", "scenes", "end", "not", "so", "too", "ending",
)
VOCABULARY = POSITIVE + NEGATIVE + FILLER
LENGTH = 10


def sentences(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sentences of token ids ``(count, LENGTH)`` and their labels (1: positive)."""
    ids = torch.randint(len(POSITIVE + NEGATIVE), len(VOCABULARY), (count, LENGTH), generator=generator)
    positives = torch.randint(0, 3, (count,), generator=generator)
    negatives = torch.randint(0, 3, (count,), generator=generator)
    negatives = torch.where(negatives == positives, (negatives + 1) % 3, negatives)  # no ties
    for row in range(count):
        places = torch.randperm(LENGTH, generator=generator)[: int(positives[row] + negatives[row])].tolist()
        words = [0] * int(positives[row]) + [1] * int(negatives[row])
        for place, negative in zip(places, words):
            offset = len(POSITIVE) if negative else 0
            ids[row, place] = offset + int(torch.randint(0, 2, (1,), generator=generator))
    return ids, (positives > negatives).long()


class LstmClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(len(VOCABULARY), 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True, bias=False)
        self.head = nn.Linear(32, 2, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.lstm(self.embedding(ids))
        return self.head(states[:, -1])


class BagClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(len(VOCABULARY), 16, mode="mean")
        self.head = nn.Linear(16, 2, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(ids))


MODELS = {"lstm": LstmClassifier, "bag": BagClassifier}


def train(model: nn.Module, steps: int, generator: torch.Generator) -> nn.Module:
    """Adam on fresh sentences every step (a few seconds for a few hundred steps)."""
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        ids, labels = sentences(64, generator)
        loss = nn.functional.cross_entropy(model(ids), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


def evaluate(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy, how often the most relevant token is a sentiment word of the predicted class,
    and word deletion (AOPC, words replaced by "the") by relevance against a random order."""
    output, relevance = lrpkit.explain(model, ids, "epsilon_plus")
    predicted = output.argmax(1)
    top = VOCABULARY_IDS[ids.gather(1, relevance.argmax(1, keepdim=True)).squeeze(1)]
    decisive = torch.where(predicted == 1, top == 1, top == -1)
    the = VOCABULARY.index("the")
    random_order = torch.rand(relevance.shape, generator=torch.Generator().manual_seed(0), dtype=relevance.dtype)
    return {
        "accuracy": float((predicted == labels).double().mean()),
        "top token decides": float(decisive.double().mean()),
        "word deletion AOPC": float(aopc(perturbation_curve(model, ids, relevance, fill=the, steps=4))),
        "random order AOPC": float(aopc(perturbation_curve(model, ids, random_order, fill=the, steps=4))),
        "conservation error": float(_relative(relevance.sum(1), output.gather(1, predicted[:, None]).squeeze(1))),
    }


def _relative(total: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
    """The largest ``|total - logit|`` relative to the largest ``|logit|``."""
    return (total - logit).abs().max() / logit.abs().max()


#: +1 for a positive word, -1 for a negative one, 0 for filler, by token id.
VOCABULARY_IDS = torch.tensor([1] * len(POSITIVE) + [-1] * len(NEGATIVE) + [0] * len(FILLER))


def show(model: nn.Module, ids: torch.Tensor) -> str:
    """One sentence with each word's relevance for the predicted class."""
    output, relevance = lrpkit.explain(model, ids[:1], "epsilon_plus")
    label = "positive" if int(output.argmax(1)) == 1 else "negative"
    words = [f"{VOCABULARY[int(token)]}({float(value):+.2f})" for token, value in zip(ids[0], relevance[0])]
    return f"{label}: " + " ".join(words)


def page(models: dict[str, nn.Module], ids: torch.Tensor) -> str:
    """An HTML page: each model's relevance for its predicted class, one coloured line per sentence."""
    sections = []
    for name, model in models.items():
        output, relevance = lrpkit.explain(model, ids, "epsilon_plus")
        bound = float(relevance.abs().max())  # one colour scale for all sentences of a model
        lines = [
            f"<p>{'positive' if int(label) == 1 else 'negative'}: "
            + image.text_heatmap([VOCABULARY[int(token)] for token in row], values, bound=bound)
            + "</p>"
            for row, values, label in zip(ids, relevance, output.argmax(1))
        ]
        sections.append(f"<h2>{name}</h2>\n" + "\n".join(lines))
    return "<!doctype html>\n<meta charset='utf-8'>\n<body>\n" + "\n".join(sections) + "\n</body>\n"


def main(
    names: Sequence[str] = ("lstm", "bag"), steps: int = 300, seed: int = 0, html: str | Path | None = None
) -> dict[str, dict[str, float]]:
    results, models = {}, {}
    for name in names:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        models[name] = model = train(MODELS[name](), steps, generator)
        ids, labels = sentences(200, generator)
        results[name] = evaluate(model, ids, labels)
        print(f"{name}: {results[name]}")
        print("  " + show(model, ids))
    if html is not None:
        Path(html).write_text(page(models, sentences(12, torch.Generator().manual_seed(seed + 1))[0]))
        print(f"wrote {html}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", metavar="MODEL", help="lstm, bag (default: both)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--html", metavar="PATH", help="write test sentences coloured by relevance to this file")
    arguments = parser.parse_args()
    unknown = sorted(set(arguments.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    main(arguments.models or list(MODELS), arguments.steps, html=arguments.html)
