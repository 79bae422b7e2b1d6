"""Recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) written out step by step, for the capture.

torch runs a recurrent layer as one fused call (``torch.lstm``), whose only backward is the
gradient. :class:`~lrpkit.canonizers.FunctionalCapture` therefore gives each such module, inside
a composite's context, a forward of its own that computes the same thing with calls the capture
explains: per layer one ``F.linear`` of the input at every time step and in both directions
(a dense layer: the composite's dense rule, a first-layer rule for all steps alike), per time
step one ``F.linear`` of the previous hidden state, added to it (a sum), the gates' ``sigmoid``
and the cell's ``tanh`` (activations), and the products and sums of the cell update. A product
of a gate and a signal gives all its relevance to the signal (the gate levels of
:class:`~lrpkit.rules.Product`), so an LSTM is explained as in Arras et al., "Explaining
Recurrent Neural Network Predictions in Sentiment Analysis" (WASSA 2017): gates get no
relevance, the cell update ``c = f c' + i g`` splits its relevance between the old cell and the
candidate in proportion to their contributions, and the pre-activation ``W_ih x + W_hh h + b``
between input and hidden state (the epsilon rule of the two maps after a proportional split
equals that of the joint map, up to the stabilisers).

The written-out forward gives the fused call's output up to rounding. A ``PackedSequence``
input (sequences of different lengths) is written out on its packed data: at time step ``t``
only the first ``batch_sizes[t]`` sequences (sorted by length) take a step, the others keep
their state, and the output is packed as the fused call packs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

#: The recurrent modules whose forward is written out (their subclasses only if they keep it).
RECURRENT_MODULES: tuple[type[nn.RNNBase], ...] = (nn.LSTM, nn.GRU, nn.RNN)

_STANDARD_FORWARDS = {cls.forward for cls in RECURRENT_MODULES}

State = Any  # a tensor, or ``(h, c)`` for an LSTM


def unrollable(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` running torch's own forward."""
    return isinstance(module, RECURRENT_MODULES) and type(module).forward in _STANDARD_FORWARDS


def unrolled_forward(module: nn.RNNBase) -> Callable[..., Any]:
    """A forward for ``module`` that computes its output time step by time step (see the module docstring)."""

    def forward(input: Any, hx: State = None) -> Any:
        if isinstance(input, PackedSequence):
            return _run_packed(module, input, hx)
        return _run(module, input, hx)

    return forward


def _run_packed(module: nn.RNNBase, packed: PackedSequence, hx: State) -> tuple[PackedSequence, State]:
    """The written-out forward on a ``PackedSequence``: packed in, packed out, as the fused call.

    ``hx`` and the final state are in the caller's order, the packed rows in the sorted one.
    """
    sizes = [int(size) for size in packed.batch_sizes]
    lstm = isinstance(module, nn.LSTM)
    h0, c0 = _initial_state(module, packed.data, sizes[0], hx, lstm)
    if packed.sorted_indices is not None and hx is not None:
        h0, c0 = h0[:, packed.sorted_indices], (None if c0 is None else c0[:, packed.sorted_indices])
    rows, final = _layers(module, packed.data, sizes, h0, c0)
    if packed.unsorted_indices is not None:
        final = _map_state(final, lambda state: state[:, packed.unsorted_indices])
    return PackedSequence(rows, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices), final


def _run(module: nn.RNNBase, input: Tensor, hx: State) -> tuple[Tensor, State]:
    """The written-out forward on a padded input: every sequence takes every step."""
    batched = input.dim() == 3
    if not batched:  # (time, features): one sequence
        input = input.unsqueeze(1)
        hx = None if hx is None else _map_state(hx, lambda state: state.unsqueeze(1))
    elif module.batch_first:
        input = input.transpose(0, 1)
    time, batch = input.shape[:2]
    h0, c0 = _initial_state(module, input, batch, hx, isinstance(module, nn.LSTM))
    rows, final = _layers(module, input.reshape(time * batch, -1), [batch] * time, h0, c0)
    output = rows.view(time, batch, -1)
    if not batched:
        return output.squeeze(1), _map_state(final, lambda state: state.squeeze(1))
    if module.batch_first:
        output = output.transpose(0, 1)
    return output, final


def _layers(
    module: nn.RNNBase, rows: Tensor, sizes: list[int], h0: Tensor, c0: Tensor | None
) -> tuple[Tensor, State]:
    """Every layer and direction over time-major rows: the last layer's hidden states and the final state.

    ``rows`` holds time step after time step, ``sizes[t]`` rows at step ``t``: the first
    ``sizes[t]`` sequences of the batch (a packed batch sorts them by length), which take the
    step while the others keep their state (in reverse, they have not started yet). A padded
    batch has ``batch`` rows at every step.
    """
    offsets = [sum(sizes[:time]) for time in range(len(sizes))]
    directions = 2 if module.bidirectional else 1
    last_h: list[Tensor] = []
    last_c: list[Tensor] = []
    for layer in range(module.num_layers):
        suffixes = [f"_l{layer}" + ("_reverse" if direction else "") for direction in range(directions)]
        projected = _input_projection(module, rows, suffixes).chunk(directions, dim=-1)
        outputs = []
        for direction, suffix in enumerate(suffixes):
            index = layer * directions + direction
            state = h0[index] if c0 is None else (h0[index], c0[index])
            step = _step_function(module, suffix)
            hidden, state = _direction(step, projected[direction], state, sizes, offsets, reverse=direction == 1)
            outputs.append(hidden)
            last_h.append(state if c0 is None else state[0])
            if c0 is not None:
                last_c.append(state[1])
        rows = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
        if module.dropout and module.training and layer < module.num_layers - 1:
            rows = F.dropout(rows, module.dropout, training=True)
    final: State = torch.stack(last_h) if c0 is None else (torch.stack(last_h), torch.stack(last_c))
    return rows, final


def _direction(
    step: Callable[[Tensor, State], State],
    projected: Tensor,
    state: State,
    sizes: list[int],
    offsets: list[int],
    reverse: bool,
) -> tuple[Tensor, State]:
    """One layer in one direction over all time steps: the hidden states as rows, and the last state."""
    hidden: list[Tensor | None] = [None] * len(sizes)
    for time in reversed(range(len(sizes))) if reverse else range(len(sizes)):
        size, offset = sizes[time], offsets[time]
        if size == sizes[0]:  # every sequence takes this step
            state = taken = step(projected[offset : offset + size], state)
        else:
            taken = step(projected[offset : offset + size], _map_state(state, lambda part: part[:size]))
            state = _joined(taken, state, size)
        hidden[time] = taken[0] if isinstance(taken, tuple) else taken
    return torch.cat(hidden), state  # type: ignore[arg-type]  # every step filled it


def _joined(taken: State, state: State, size: int) -> State:
    """The state after a step of the first ``size`` sequences: theirs, then the others' unchanged."""
    if isinstance(taken, tuple):
        return tuple(torch.cat([new, old[size:]]) for new, old in zip(taken, state))
    return torch.cat([taken, state[size:]])


def _map_state(state: State, change: Callable[[Tensor], Tensor]) -> State:
    return tuple(change(part) for part in state) if isinstance(state, tuple) else change(state)


def _initial_state(
    module: nn.RNNBase, input: Tensor, batch: int, hx: State, lstm: bool
) -> tuple[Tensor, Tensor | None]:
    """``(h0, c0)`` per layer and direction: the given state, or zeros (``c0`` only for an LSTM).

    Zeros that carry relevance like a state computed from the input (and get none, being zero):
    as a constant, a GRU's first ``reset * (W_hn h0 + b_hn)`` would give its relevance to the
    reset gate instead of to the bias, unlike every later step.
    """
    layers = module.num_layers * (2 if module.bidirectional else 1)
    hidden = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    carries = torch.is_grad_enabled() and input.requires_grad
    if hx is None:
        h0 = input.new_zeros(layers, batch, hidden).requires_grad_(carries)
        return h0, input.new_zeros(layers, batch, module.hidden_size).requires_grad_(carries) if lstm else None
    if lstm:
        return _carrying(hx[0], carries), _carrying(hx[1], carries)
    return _carrying(hx, carries), None


def _carrying(state: Tensor, carries: bool) -> Tensor:
    """A given state as one that carries relevance (a new leaf if it is a constant; the caller's is not changed)."""
    return state.detach().requires_grad_(True) if carries and not state.requires_grad else state


def _input_projection(module: nn.RNNBase, input: Tensor, suffixes: list[str]) -> Tensor:
    """``W_ih x_t + b`` for every time step and direction of one layer: one dense layer call.

    One call, so that a composite's first-layer rule (Flat) reaches every time step and both
    directions. ``b`` is ``b_ih + b_hh``, except for a GRU, whose ``b_hh`` stays inside the
    reset gate's product.
    """
    weight = torch.cat([getattr(module, "weight_ih" + suffix) for suffix in suffixes])
    if not module.bias:
        return F.linear(input, weight)
    biases = [getattr(module, "bias_ih" + suffix) for suffix in suffixes]
    if not isinstance(module, nn.GRU):
        biases = [bias + getattr(module, "bias_hh" + suffix) for bias, suffix in zip(biases, suffixes)]
    return F.linear(input, weight, torch.cat(biases))


def _step_function(module: nn.RNNBase, suffix: str) -> Callable[[Tensor, State], State]:
    """One time step, from the step's input projection and the previous state."""
    weight_hh = getattr(module, "weight_hh" + suffix)
    if isinstance(module, nn.LSTM):
        return _lstm_step(weight_hh, getattr(module, "weight_hr" + suffix, None))
    if isinstance(module, nn.GRU):
        return _gru_step(weight_hh, getattr(module, "bias_hh" + suffix) if module.bias else None)
    activation = torch.tanh if module.nonlinearity == "tanh" else torch.relu
    return lambda projected, h: activation(projected + F.linear(h, weight_hh))


def _lstm_step(weight_hh: Tensor, projection: Tensor | None) -> Callable[[Tensor, State], State]:
    def step(projected: Tensor, state: State) -> State:
        h, c = state
        i, f, g, o = (projected + F.linear(h, weight_hh)).chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return (h if projection is None else F.linear(h, projection)), c

    return step


def _gru_step(weight_hh: Tensor, bias_hh: Tensor | None) -> Callable[[Tensor, State], State]:
    def step(projected: Tensor, h: State) -> State:
        x_r, x_z, x_n = projected.chunk(3, dim=-1)
        h_r, h_z, h_n = F.linear(h, weight_hh, bias_hh).chunk(3, dim=-1)
        reset, update = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        candidate = torch.tanh(x_n + reset * h_n)
        return (1 - update) * candidate + update * h

    return step
