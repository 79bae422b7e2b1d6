"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) explained step by step inside a context.

The written-out forward must give the fused call's output (float64, 1e-12) and be removed
afterwards; an LSTM's relevance must equal an independent matrix-form implementation of the
LSTM rules of Arras et al. 2017 (gates get none, the cell update splits proportionally, epsilon on
the joint input and recurrent map); every configuration must conserve relevance without biases.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from helpers import hooks_left
from lrpkit import composites
from lrpkit.attribution import Gradient
from lrpkit.canonizers import FunctionalCapture, MergeBatchNorm

DTYPE = torch.float64
EPS = 1e-12


class Head(nn.Module):
    """A recurrent layer and a dense head on its output at the last time step."""

    def __init__(self, recurrent: nn.RNNBase) -> None:
        super().__init__()
        self.recurrent = recurrent
        width = recurrent.proj_size if getattr(recurrent, "proj_size", 0) else recurrent.hidden_size
        self.head = nn.Linear(width * (2 if recurrent.bidirectional else 1), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.recurrent(x)
        return self.head(output[:, -1])


CONFIGS: dict[str, Callable[[], nn.RNNBase]] = {
    "lstm": lambda: nn.LSTM(4, 5, batch_first=True),
    "lstm 2 layers bidirectional": lambda: nn.LSTM(4, 5, num_layers=2, bidirectional=True, batch_first=True),
    "lstm projected": lambda: nn.LSTM(4, 6, proj_size=3, batch_first=True),
    "gru 2 layers": lambda: nn.GRU(4, 5, num_layers=2, batch_first=True),
    "gru bidirectional": lambda: nn.GRU(4, 5, bidirectional=True, batch_first=True),
    "rnn tanh": lambda: nn.RNN(4, 5, batch_first=True),
    "rnn relu": lambda: nn.RNN(4, 5, nonlinearity="relu", batch_first=True),
}


def composite() -> composites.Composite:
    return composites.EpsilonPlus(epsilon=EPS, stabilizer=EPS)


def build(config: str, seed: int = 0) -> Head:
    torch.manual_seed(seed)
    return Head(CONFIGS[config]()).to(DTYPE).eval()


@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_written_out_forward_is_the_fused_one_and_goes_away(config: str) -> None:
    model = build(config)
    recurrent = model.recurrent
    x = torch.randn(2, 6, 4, dtype=DTYPE)
    state = torch.randn(recurrent.num_layers * (2 if recurrent.bidirectional else 1), 2, 5 if config != "lstm projected" else 3, dtype=DTYPE)
    expected = model(x)
    expected_sequence, expected_state = recurrent(x)
    with composite().context(model):
        assert "forward" in recurrent.__dict__
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-14)
        sequence, final = recurrent(x)
        if isinstance(recurrent, nn.GRU) or isinstance(recurrent, nn.RNN):  # a given initial state, too
            torch.testing.assert_close(recurrent(x, state)[0], _fused(recurrent, x, state)[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sequence, expected_sequence, rtol=1e-12, atol=1e-14)
    for part, expected_part in zip(final if isinstance(final, tuple) else (final,), expected_state if isinstance(expected_state, tuple) else (expected_state,)):
        torch.testing.assert_close(part, expected_part, rtol=1e-12, atol=1e-14)
    assert "forward" not in recurrent.__dict__ and hooks_left(model) == []


def _fused(recurrent: nn.RNNBase, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return type(recurrent).forward(recurrent, x, state)


def test_unbatched_input_and_initial_state() -> None:
    torch.manual_seed(1)
    lstm = nn.LSTM(4, 5, num_layers=2).to(DTYPE)
    x, h, c = torch.randn(6, 4, dtype=DTYPE), torch.randn(2, 5, dtype=DTYPE), torch.randn(2, 5, dtype=DTYPE)
    expected, (expected_h, expected_c) = lstm(x, (h, c))
    with composite().context(lstm):
        output, (last_h, last_c) = lstm(x, (h, c))
    for ours, theirs in ((output, expected), (last_h, expected_h), (last_c, expected_c)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_relevance_is_conserved_without_biases(config: str) -> None:
    model = build(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "bias" in name:
                parameter.zero_()
    x = torch.randn(2, 6, 4, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explained: no UncoveredModuleWarning
        output, relevance = Gradient(model, composite())(x, target=1)
    torch.testing.assert_close(relevance.flatten(1).sum(1), output[:, 1], rtol=1e-8, atol=1e-12)
    gradient = Gradient(model)(x, target=1).relevance
    assert not torch.allclose(relevance, gradient, rtol=1e-3)  # the rules act


def _stab(z: torch.Tensor) -> torch.Tensor:
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def arras_lstm_relevance(model: Head, x: torch.Tensor, target: int) -> torch.Tensor:
    """LRP for a one-layer LSTM and a dense head (Arras et al. 2017), written out in matrix form.

    Gates (input, forget, output) get no relevance; ``c_t = f c_{t-1} + i g`` splits ``R(c_t)``
    between ``f c_{t-1}`` and ``i g`` in proportion; ``h_t = o tanh(c_t)`` and ``i g`` hand all
    their relevance to the signal; the pre-activation ``W [x_t; h_{t-1}] + b`` gets the epsilon rule.
    """
    lstm = model.recurrent
    weight = torch.cat([lstm.weight_ih_l0, lstm.weight_hh_l0], dim=1).detach()
    bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach()
    hidden = lstm.hidden_size
    steps = x.shape[1]
    h = [torch.zeros(x.shape[0], hidden, dtype=DTYPE)]
    c = [torch.zeros(x.shape[0], hidden, dtype=DTYPE)]
    joint, pre, gates = [], [], []
    for t in range(steps):
        a = torch.cat([x[:, t], h[-1]], dim=1)
        z = a @ weight.T + bias
        i, f, g, o = torch.sigmoid(z[:, :hidden]), torch.sigmoid(z[:, hidden:2 * hidden]), torch.tanh(z[:, 2 * hidden:3 * hidden]), torch.sigmoid(z[:, 3 * hidden:])
        c.append(f * c[-1] + i * g)
        h.append(o * torch.tanh(c[-1]))
        joint.append(a)
        pre.append(z[:, 2 * hidden:3 * hidden])
        gates.append((i, f, g, o))
    head_w, head_b = model.head.weight.detach(), model.head.bias.detach()
    y = h[-1] @ head_w.T + head_b
    start = torch.zeros_like(y)
    start[:, target] = y[:, target]
    relevance_h = h[-1] * ((start / _stab(y)) @ head_w)
    relevance_c = torch.zeros_like(relevance_h)
    relevance_x = torch.zeros_like(x)
    for t in reversed(range(steps)):
        i, f, g, o = gates[t]
        tanh_c = torch.tanh(c[t + 1])
        relevance_c = relevance_c + (o * tanh_c) * relevance_h / _stab(o * tanh_c)  # all to tanh(c), then through it
        share = relevance_c / _stab(c[t + 1])
        from_old, from_new = f * c[t] * share, i * g * share
        relevance_c = (f * c[t]) * from_old / _stab(f * c[t])  # all to the old cell
        relevance_g = (i * g) * from_new / _stab(i * g)  # all to the candidate, through its tanh
        weight_g = weight[2 * hidden:3 * hidden]
        relevance_joint = joint[t] * ((relevance_g / _stab(pre[t])) @ weight_g)
        relevance_x[:, t] = relevance_joint[:, : x.shape[2]]
        relevance_h = relevance_joint[:, x.shape[2]:]
    return relevance_x


def test_lstm_relevance_equals_the_matrix_form_of_arras_et_al() -> None:
    model = build("lstm", seed=3)
    x = torch.randn(3, 5, 4, dtype=DTYPE)
    ours = Gradient(model, composite())(x, target=2).relevance
    torch.testing.assert_close(ours, arras_lstm_relevance(model, x, target=2), rtol=1e-7, atol=1e-12)


class PackedHead(nn.Module):
    """Sequences of different lengths, packed: the head reads each one's last hidden state (h_n)."""

    def __init__(self, recurrent: nn.RNNBase, lengths: list[int], enforce_sorted: bool) -> None:
        super().__init__()
        self.recurrent, self.lengths, self.enforce_sorted = recurrent, lengths, enforce_sorted
        width = recurrent.proj_size if getattr(recurrent, "proj_size", 0) else recurrent.hidden_size
        self.head = nn.Linear(width * (2 if recurrent.bidirectional else 1), 3)

    def forward(self, x: torch.Tensor, hx: object = None) -> torch.Tensor:
        packed = pack_padded_sequence(x, torch.tensor(self.lengths), batch_first=True, enforce_sorted=self.enforce_sorted)
        output, state = self.recurrent(packed, hx)
        self.packed_output, self.state = output, state
        h = state[0] if isinstance(state, tuple) else state
        directions = 2 if self.recurrent.bidirectional else 1
        return self.head(torch.cat(list(h[-directions:]), dim=-1))


PACKED = ["lstm", "lstm 2 layers bidirectional", "lstm projected", "gru bidirectional", "rnn tanh"]


def _packed(config: str, lengths: list[int], enforce_sorted: bool) -> PackedHead:
    torch.manual_seed(0)
    return PackedHead(CONFIGS[config](), lengths, enforce_sorted).to(DTYPE).eval()


@pytest.mark.parametrize("config", PACKED)
@pytest.mark.parametrize("lengths", [[3, 6, 1, 6], [6, 4, 4, 2]])
def test_packed_sequences_are_written_out_too(config: str, lengths: list[int]) -> None:
    """Packed in, packed out, as the fused call (same data, batch sizes and orders, same final
    state), with a given initial state too; each sequence's relevance equals that of the same
    sequence explained alone, unpacked, and the module keeps no gradient (no warning)."""
    model = _packed(config, lengths, enforce_sorted=lengths == sorted(lengths, reverse=True))
    x = torch.randn(len(lengths), max(lengths), 4, dtype=DTYPE)
    fused = model(x)
    fused_output, fused_state = model.packed_output, model.state
    with composite().context(model):
        written = model(x)
        assert "forward" in model.recurrent.__dict__
        for got, want in zip((model.packed_output, *_flat(model.state)), (fused_output, *_flat(fused_state))):
            got, want = (got.data, want.data) if hasattr(got, "batch_sizes") else (got, want)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert torch.equal(model.packed_output.batch_sizes, fused_output.batch_sizes)
        for attribute in ("sorted_indices", "unsorted_indices"):
            got, want = getattr(model.packed_output, attribute), getattr(fused_output, attribute)
            assert (got is None and want is None) or torch.equal(got, want)
    torch.testing.assert_close(written, fused, rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = Gradient(model, composite())(x, target=1)
    for row, length in enumerate(lengths):
        alone = build_like(model)
        _, expected = Gradient(alone, composite())(x[row : row + 1, :length], target=1)
        torch.testing.assert_close(result.relevance[row, :length], expected[0], rtol=1e-9, atol=1e-12)
        assert torch.all(result.relevance[row, length:] == 0)


def _flat(state: object) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, tuple) else (state,)


class LastState(nn.Module):
    """The packed model's layers on one unpacked sequence: the head on h_n."""

    def __init__(self, packed: PackedHead) -> None:
        super().__init__()
        self.recurrent, self.head = packed.recurrent, packed.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, state = self.recurrent(x)
        h = state[0] if isinstance(state, tuple) else state
        directions = 2 if self.recurrent.bidirectional else 1
        return self.head(torch.cat(list(h[-directions:]), dim=-1))


def build_like(model: PackedHead) -> LastState:
    return LastState(model)


def test_packed_sequence_with_an_initial_state() -> None:
    model = _packed("lstm 2 layers bidirectional", [2, 5, 3], enforce_sorted=False)
    x = torch.randn(3, 5, 4, dtype=DTYPE)
    hx = (torch.randn(4, 3, 5, dtype=DTYPE), torch.randn(4, 3, 5, dtype=DTYPE))
    fused = model(x, hx)
    fused_state = model.state
    with composite().context(model):
        torch.testing.assert_close(model(x, hx), fused, rtol=1e-12, atol=1e-12)
        for got, want in zip(model.state, fused_state):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unroll_recurrent_false_keeps_the_fused_call() -> None:
    model = build("lstm")
    keep = composites.EpsilonPlus(canonizers=[MergeBatchNorm(), FunctionalCapture(unroll_recurrent=False)])
    with pytest.warns(composites.UncoveredModuleWarning, match=r"'recurrent' \(LSTM\)"):
        Gradient(model, keep)(torch.randn(2, 6, 4, dtype=DTYPE), target=0)


@pytest.mark.parametrize("config", ["lstm 2 layers bidirectional", "gru bidirectional"])
def test_a_first_layer_rule_reaches_every_time_step_and_direction(config: str) -> None:
    """The input projection of the first layer is one dense layer call: Flat spreads each step's
    relevance evenly over its features, at every time step, in both directions."""
    model = build(config)
    x = torch.randn(2, 6, 4, dtype=DTYPE)
    relevance = Gradient(model, composites.EpsilonPlusFlat())(x, target=0).relevance
    torch.testing.assert_close(relevance, relevance[:, :, :1].expand_as(relevance), rtol=1e-10, atol=1e-14)
    assert relevance[:, :, 0].abs().min() > 0  # every step got relevance
