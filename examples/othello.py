"""Explain an AlphaZero-style Othello network: which squares drive its value and one move.

The network (random weights from a seed; the point is the mechanics, not the play) reads three
8x8 planes from the point of view of the side to move: its own stones, the opponent's stones
and the legal moves. A convolutional trunk with residual blocks (``torch.relu(x + y)`` in
``forward``; lrpkit's ``FunctionalCapture`` sees and names the addition) and BatchNorm (merged
into the convolutions by ``MergeBatchNorm`` while explaining) feeds two heads, and the model
returns a dict:

- ``"policy"``: 65 move logits (64 squares, index ``8 * row + column``, then "pass");
- ``"value"``: the expected outcome for the side to move, ``tanh`` of a scalar, in (-1, 1).

Two explanations with ``EpsilonPlusFlat``:

(a) the value: ``Gradient(model, composite, output="value")`` with the value itself as the
    starting relevance (a callable target ``lambda value: value``); ``tanh`` is captured with
    the ``Pass`` rule, so the relevance sums to the value (exactly so when all biases are zero);
(b) the logit of one move: ``Gradient(model, composite, output="policy")`` with
    ``target=move_index``; the relevance sums to that logit (same caveat).

Each relevance (3 planes x 8 x 8) is shown summed over the planes and plane by plane, blended
with :func:`lrpkit.image.overlay` onto a picture of the board (stones drawn with Pillow), in
one PNG grid.

Run it::

    python examples/othello.py --out othello.png          # a few seconds on a CPU
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from lrpkit import composites, image
from lrpkit.attribution import Gradient

EMPTY, BLACK, WHITE = 0, 1, -1
SIZE = 8
PASS = SIZE * SIZE  # index of the "pass" logit
DIRECTIONS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
OPENING = ("f5", "d6", "c3", "d3", "c4")  # the "tiger" opening; white is to move after it
PLANES = ("own stones", "opponent stones", "legal moves")

# ----------------------------------------------------------------------------- game rules


def square_name(row: int, col: int) -> str:
    """Algebraic name of a square: columns a-h, rows 1-8 (row 0 is rank 1, drawn at the top)."""
    return f"{'abcdefgh'[col]}{row + 1}"


def parse_square(name: str) -> tuple[int, int]:
    """``"f5"`` -> ``(4, 5)`` (row, column)."""
    name = name.strip().lower()
    if len(name) != 2 or name[0] not in "abcdefgh" or name[1] not in "12345678":
        raise ValueError(f"not a square: {name!r} (expected a1 .. h8)")
    return int(name[1]) - 1, "abcdefgh".index(name[0])


def start_board() -> np.ndarray:
    """The standard start: white on d4 and e5, black on e4 and d5; black moves first."""
    board = np.zeros((SIZE, SIZE), dtype=np.int8)
    board[parse_square("d4")] = board[parse_square("e5")] = WHITE
    board[parse_square("e4")] = board[parse_square("d5")] = BLACK
    return board


def flips(board: np.ndarray, player: int, row: int, col: int) -> list[tuple[int, int]]:
    """The opponent stones that ``player`` would flip by playing ``(row, col)``."""
    if board[row, col] != EMPTY:
        return []
    flipped: list[tuple[int, int]] = []
    for dr, dc in DIRECTIONS:
        line: list[tuple[int, int]] = []
        r, c = row + dr, col + dc
        while 0 <= r < SIZE and 0 <= c < SIZE and board[r, c] == -player:
            line.append((r, c))
            r, c = r + dr, c + dc
        if line and 0 <= r < SIZE and 0 <= c < SIZE and board[r, c] == player:
            flipped.extend(line)
    return flipped


def legal_moves(board: np.ndarray, player: int) -> list[tuple[int, int]]:
    """Every square where ``player`` may play (flips at least one stone), row by row."""
    return [(r, c) for r in range(SIZE) for c in range(SIZE) if flips(board, player, r, c)]


def play(board: np.ndarray, player: int, row: int, col: int) -> np.ndarray:
    """A new board with ``player``'s stone on ``(row, col)`` and the flipped stones turned."""
    flipped = flips(board, player, row, col)
    if not flipped:
        raise ValueError(f"{square_name(row, col)} is not a legal move for "
                         f"{'black' if player == BLACK else 'white'}")
    after = board.copy()
    after[row, col] = player
    for r, c in flipped:
        after[r, c] = player
    return after


def position_after(moves: Sequence[str]) -> tuple[np.ndarray, int]:
    """The board after ``moves`` from the start (black first, alternating), and who is to move."""
    board, player = start_board(), BLACK
    for move in moves:
        board = play(board, player, *parse_square(move))
        player = -player
    return board, player


def encode(board: np.ndarray, player: int) -> Tensor:
    """Input planes for the side to move, shaped (1, 3, 8, 8): own, opponent, legal moves."""
    legal = np.zeros((SIZE, SIZE))
    for r, c in legal_moves(board, player):
        legal[r, c] = 1.0
    planes = np.stack([board == player, board == -player, legal]).astype(np.float32)
    return torch.from_numpy(planes)[None]


# ---------------------------------------------------------------------------------- model


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the skip connection, written as ``torch.relu(x + y)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(x + y)


class OthelloNet(nn.Module):
    """AlphaZero-style policy-value network for an 8x8 board.

    ``forward(planes)`` takes (N, 3, 8, 8) and returns ``{"policy": (N, 65), "value": (N, 1)}``.
    """

    def __init__(self, channels: int = 32, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(len(PLANES), channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(),
        )
        self.trunk = nn.Sequential(*[ResidualBlock(channels) for _ in range(blocks)])
        self.policy_head = nn.Sequential(
            nn.Conv2d(channels, 2, 1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * SIZE * SIZE, SIZE * SIZE + 1),
        )
        self.value_head = nn.Sequential(
            nn.Conv2d(channels, 1, 1, bias=False), nn.BatchNorm2d(1), nn.ReLU(),
            nn.Flatten(), nn.Linear(SIZE * SIZE, 64), nn.ReLU(), nn.Linear(64, 1),
        )

    def forward(self, planes: Tensor) -> dict[str, Tensor]:
        features = self.trunk(self.stem(planes))
        return {"policy": self.policy_head(features),
                "value": torch.tanh(self.value_head(features))}


def build_model(seed: int = 0, channels: int = 32, blocks: int = 3,
                zero_biases: bool = False) -> OthelloNet:
    """An :class:`OthelloNet` with seeded random weights and BatchNorm statistics, in eval mode.

    Weights are drawn with He initialisation (so that the signal keeps its scale through the
    layers and the outputs are not all close to zero); the BatchNorm running statistics and
    affine parameters are drawn too (as if trained), so that merging them into the
    convolutions is not a no-op. With ``zero_biases`` the dense
    layers' biases and BatchNorm's shifts (``bias`` and ``running_mean``) are zero, so that no
    relevance is absorbed by biases and the explanations conserve the explained output. The
    global RNG is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OthelloNet(channels, blocks)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.1, 0.1)
                if zero_biases:
                    for name in ("bias", "running_mean"):
                        tensor = getattr(module, name, None)
                        if tensor is not None:
                            tensor.zero_()
    return model.eval()


# -------------------------------------------------------------------------- explanations


def explain_value(model: nn.Module, planes: Tensor,
                  composite: composites.Composite | None = None) -> tuple[Tensor, Tensor]:
    """``(value, relevance)``: the value head explained, starting from the value itself.

    The target is a callable giving the starting relevance shaped like the value output (N, 1);
    ``lambda value: torch.ones_like(value)`` would distribute one unit instead. The composite
    defaults to ``EpsilonPlusFlat``.
    """
    composite = composites.EpsilonPlusFlat() if composite is None else composite
    attribution = Gradient(model, composite, output="value")
    value, relevance = attribution(planes, target=lambda value: value)
    return value, relevance


def explain_move(model: nn.Module, planes: Tensor, move: int,
                 composite: composites.Composite | None = None) -> tuple[Tensor, Tensor]:
    """``(policy logits, relevance)`` for the logit of move index ``move`` (``8 * row + col``)."""
    composite = composites.EpsilonPlusFlat() if composite is None else composite
    attribution = Gradient(model, composite, output="policy")
    policy, relevance = attribution(planes, target=move)
    return policy, relevance


def best_legal_move(policy: Tensor, legal: Sequence[tuple[int, int]]) -> int:
    """The legal move with the highest logit (the pass index if there is none)."""
    if not legal:
        return PASS
    indices = [SIZE * r + c for r, c in legal]
    return max(indices, key=lambda index: float(policy[0, index]))


# ------------------------------------------------------------------------------ drawing

BOARD_COLOUR = (214, 219, 204)
LINE_COLOUR = (90, 100, 90)


def draw_board(board: np.ndarray, square: int = 32, dots: Sequence[tuple[int, int]] = (),
               ring: tuple[int, int] | None = None) -> np.ndarray:
    """The board as a uint8 (8 * square, 8 * square, 3) picture; row 0 (rank 1) at the top.

    Stones are black and white discs; ``dots`` marks squares with a small dot (legal moves),
    ``ring`` draws a green ring around one square (the explained move).
    """
    side = SIZE * square
    picture = Image.new("RGB", (side, side), BOARD_COLOUR)
    draw = ImageDraw.Draw(picture)
    for index in range(SIZE + 1):
        offset = min(index * square, side - 1)
        draw.line([(offset, 0), (offset, side - 1)], fill=LINE_COLOUR)
        draw.line([(0, offset), (side - 1, offset)], fill=LINE_COLOUR)
    margin = max(2, square // 8)
    for r in range(SIZE):
        for c in range(SIZE):
            box = (c * square + margin, r * square + margin,
                   (c + 1) * square - margin, (r + 1) * square - margin)
            if board[r, c] == BLACK:
                draw.ellipse(box, fill=(25, 25, 25), outline=(0, 0, 0))
            elif board[r, c] == WHITE:
                draw.ellipse(box, fill=(250, 250, 250), outline=(60, 60, 60))
    for r, c in dots:
        centre_x, centre_y, radius = (c + 0.5) * square, (r + 0.5) * square, square / 10
        draw.ellipse((centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius),
                     fill=LINE_COLOUR)
    if ring is not None:
        r, c = ring
        draw.ellipse((c * square + 1, r * square + 1, (c + 1) * square - 1, (r + 1) * square - 1),
                     outline=(0, 150, 0), width=max(2, square // 12))
    return np.asarray(picture)


def relevance_row(board_picture: np.ndarray, flat: Tensor, by_plane: Tensor,
                  alpha: float = 0.6) -> list[np.ndarray]:
    """Overlays on the board: ``flat`` (1, 3, 8, 8) summed over planes, then ``by_plane``'s planes.

    The planes share one scale (the largest ``|R|`` among them), so their colours compare;
    squares with ``|R|`` below 2% of the scale keep the plain board.
    """
    planes = by_plane[0].detach().cpu().numpy()
    bound = float(np.abs(planes).max()) or None
    summed = image.overlay(board_picture, flat[0], alpha=alpha, threshold=0.02)  # reduce="sum"
    return [summed, *(image.overlay(board_picture, plane, alpha=alpha, bound=bound,
                                    threshold=0.02) for plane in planes)]


# --------------------------------------------------------------------------------- main


def main(out: str | Path = "othello.png", seed: int = 0, moves: Sequence[str] = OPENING,
         square: int = 32, device: str = "cpu", zero_biases: bool = False,
         verbose: bool = True) -> dict[str, Any]:
    """Build the position and the model, explain the value and the best legal move, write a PNG.

    Parameters
    ----------
    out
        The PNG to write.
    seed
        Seed of the random weights.
    moves
        The opening played from the start position (black first).
    square
        Pixels per board square.
    device
        ``"cpu"`` or ``"cuda"``.
    zero_biases
        Build the model without biases (see :func:`build_model`): the relevance then sums to
        the value and to the move's logit.
    verbose
        Print the values, the relevance sums and the path.

    Returns
    -------
    dict
        ``path`` (the PNG written), ``size`` (its width and height), ``model``, ``planes``
        (the input), ``value`` (N, 1) and ``value_relevance``, ``move`` (index), ``move_name``,
        ``policy`` (N, 65) and ``move_relevance``, all with ``EpsilonPlusFlat``, and
        ``value_by_plane`` and ``move_by_plane`` with ``EpsilonPlus``; relevance tensors are
        shaped like the input.
    """
    board, player = position_after(moves)
    legal = legal_moves(board, player)
    model = build_model(seed, zero_biases=zero_biases).to(device)
    planes = encode(board, player).to(device)

    value, value_relevance = explain_value(model, planes)
    _, value_by_plane = explain_value(model, planes, composites.EpsilonPlus())
    with torch.no_grad():
        policy = model(planes)["policy"]
    move = best_legal_move(policy, legal)
    policy, move_relevance = explain_move(model, planes, move)
    _, move_by_plane = explain_move(model, planes, move, composites.EpsilonPlus())
    move_name = "pass" if move == PASS else square_name(*divmod(move, SIZE))

    plain = draw_board(board, square, dots=legal)
    ringed = draw_board(board, square, ring=None if move == PASS else divmod(move, SIZE))
    rows = [[plain, *relevance_row(plain, value_relevance, value_by_plane)],
            [ringed, *relevance_row(ringed, move_relevance, move_by_plane)]]
    side = "black" if player == BLACK else "white"
    opening = f"after {' '.join(moves)}" if moves else "at the start"
    logit = float(policy[0, move])
    row_labels = [
        f"value\n{float(value):+.3f}\nsum R {float(value_relevance.sum()):+.3f}",
        f"move {move_name}\nlogit {logit:+.3f}\nsum R {float(move_relevance.sum()):+.3f}",
    ]
    col_labels = ["position", "all planes\nEpsilonPlusFlat",
                  *(f"{plane}\nEpsilonPlus" for plane in PLANES)]
    picture = image.grid(
        rows, row_labels=row_labels, col_labels=col_labels, scale=1, padding=6,
        title=f"Othello, {side} to move {opening} (random weights); "
              "relevance red: for, blue: against",
    )
    path = image.save_png(picture, out)
    if verbose:
        print(f"value {float(value):+.4f}, relevance sum {float(value_relevance.sum()):+.4f}")
        print(f"move {move_name}: logit {logit:+.4f}, relevance sum {float(move_relevance.sum()):+.4f}")
        print(f"wrote {path} ({picture.size[0]}x{picture.size[1]})")
    return {
        "path": path, "size": picture.size, "model": model, "planes": planes,
        "value": value, "value_relevance": value_relevance, "value_by_plane": value_by_plane,
        "move": move, "move_name": move_name, "policy": policy,
        "move_relevance": move_relevance, "move_by_plane": move_by_plane,
    }


def _parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="othello.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--moves", default=" ".join(OPENING),
                        help="opening moves from the start position (default: %(default)s)")
    parser.add_argument("--square", type=int, default=32, help="pixels per board square")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--zero-biases", action="store_true",
                        help="a model without biases: the relevance sums to the explained output")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse_args()
    started = time.perf_counter()
    main(out=args.out, seed=args.seed, moves=args.moves.split(), square=args.square,
         device=args.device, zero_biases=args.zero_biases)
    print(f"done in {time.perf_counter() - started:.1f} s")
