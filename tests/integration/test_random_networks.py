"""Random networks built from the blocks real models use, explained under every preset.

The networks are drawn from a vocabulary of layers and functional calls: for images (and,
fewer of them, for 1-D signals and 3-D volumes), convolutions with every padding mode, stride,
dilation and grouping, transposed convolutions, BatchNorm after both and after weight-normed
layers, pooling of every kind, residual sums written four ways, concatenations, pads,
resampling, shuffles, slices, flips, rolls, an ``einsum`` and an ``F.conv2d`` with a parameter,
max unpooling, ``torch.where`` with a constant mask; for sequences,
token embeddings, attention (``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention``,
causal or not), layer, RMS and group norms, gates, SwiGLU, class tokens, layer scales, token
mixing; modern image blocks (smooth activations, batch, group, instance and layer norms,
squeeze-and-excitation and spatial gates, ConvNeXt and inverted residual blocks, GLUs, the pixels
as tokens of an attention); and language models written as transformers writes them (rotary
embeddings, grouped-query attention with ``repeat_kv``, causal masks filled or added, ALiBi,
sliding windows, written-out RMS norms, gated MLPs, top-2 mixtures of experts with
``index_add_``, tied heads). Properties that hold independently of any reference implementation:

* LRP-0 (epsilon 0 on every layer, the proportional split at sums, pools and resamplings) equals
  gradient x input on the piecewise-linear image networks, biases included;
* without biases, EpsilonGammaBox conserves relevance on the image networks (and the modern
  ones), and Epsilon on every layer conserves it on the sequence networks, the modern image
  networks and the language models;
* every preset runs without an error or a warning, gives finite relevance and the model's own
  output, and leaves the model as it was (state, modules, attributes, hooks).

The seeds are fixed, so every run explains the same networks. A longer run of the same generator
(thousands of networks) found what these tests now guard: a weight-normed layer's BatchNorm was
not merged, a ``ConvTranspose -> BatchNorm`` pair neither, and a first layer's z^B, flat and w^2
lost relevance behind a max unpooling. All in float64.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import hooks_left
from lrpkit import composites, rules, types
from lrpkit.attribution import Gradient
from lrpkit.canonizers import default_canonizers

#: Stabiliser of the exact checks: far below float64 round-off relative to any activation.
TINY = 1e-14
IMAGE_SHAPE = (2, 4, 12, 12)
TOKENS, WIDTH, VOCABULARY = 6, 8, 20


# --------------------------------------------------------------------------------------------
# image blocks: each maps (N, C, H, W) to (N, C', H', W'); ``channels`` is C
# --------------------------------------------------------------------------------------------


class Call(nn.Module):
    """A functional step ``function(self, x)`` with the modules and parameters it uses."""

    def __init__(self, function: Callable[..., torch.Tensor], **parts: nn.Module | nn.Parameter | torch.Tensor) -> None:
        super().__init__()
        self.function = function
        for name, part in parts.items():
            if isinstance(part, (nn.Module, nn.Parameter)):
                setattr(self, name, part)
            else:
                self.register_buffer(name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(self, x)


def randomized_norm(norm: nn.Module, rng: random.Random) -> nn.Module:
    """A BatchNorm with random statistics and affine parameters (some scales negative)."""
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5, generator=generator)
        norm.running_var.uniform_(0.5, 2.0, generator=generator)
        norm.weight.uniform_(-0.5, 1.5, generator=generator)
        norm.bias.uniform_(-0.2, 0.2, generator=generator)
    return norm


def conv(rng: random.Random, channels: int) -> list[nn.Module]:
    kernel, stride, dilation = rng.choice([1, 3, 5]), rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
    mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
    padding: int | str = rng.choice([0, kernel // 2, "same"]) if stride == 1 and mode == "zeros" else kernel // 2
    groups = rng.choice([1, 1, channels])
    out = channels if groups == channels else rng.choice([3, 4, 6])
    layer = nn.Conv2d(channels, out, kernel, stride, padding, dilation, groups, bias=rng.random() < 0.7, padding_mode=mode)
    return [layer, randomized_norm(nn.BatchNorm2d(out), rng)] if rng.random() < 0.4 else [layer]


def transposed_conv(rng: random.Random, channels: int) -> list[nn.Module]:
    stride, kernel = rng.choice([1, 2]), rng.choice([2, 3])
    padding = rng.choice([0, 1]) if kernel == 3 else 0
    extra = rng.choice([0, 1]) if stride == 2 and padding else 0
    groups = rng.choice([1, 2]) if channels % 2 == 0 else 1
    layer = nn.ConvTranspose2d(channels, 2 * groups, kernel, stride, padding, extra, groups)
    shrink = Call(lambda self, x: F.avg_pool2d(x, 2) if x.shape[-1] > 16 else x)
    norm = [randomized_norm(nn.BatchNorm2d(2 * groups), rng)] if rng.random() < 0.5 else []
    return [layer, *norm, shrink]


def weight_normed_conv(rng: random.Random, channels: int) -> list[nn.Module]:
    layer = nn.utils.parametrizations.weight_norm(nn.Conv2d(channels, channels, 3, padding=1))
    return [layer, randomized_norm(nn.BatchNorm2d(channels), rng)]


def activation(rng: random.Random, channels: int) -> list[nn.Module]:
    return [rng.choice([nn.ReLU(), nn.LeakyReLU(0.1), Call(lambda self, x: torch.relu(x)), Call(lambda self, x: x.clamp(min=0))])]


def pooling(rng: random.Random, channels: int) -> list[nn.Module]:
    kernel, stride = rng.choice([2, 3]), rng.choice([1, 2])
    padding = rng.choice([0, 1]) if kernel == 3 else 0
    return [rng.choice([
        nn.MaxPool2d(kernel, stride, padding, ceil_mode=rng.random() < 0.3),
        nn.AvgPool2d(kernel, stride, padding, count_include_pad=rng.random() < 0.5),
        nn.AdaptiveAvgPool2d(rng.choice([3, 5])),
        nn.AdaptiveMaxPool2d(rng.choice([3, 5])),
        nn.MaxPool2d(2, 1, dilation=2),
    ])]


def residual(rng: random.Random, channels: int) -> list[nn.Module]:
    how = rng.choice(["x + y", "y += x", "torch.add", "y.add_(x)", "x - y", "maximum", "stack"])

    def forward(self: Call, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        if how == "x + y":
            return x + y
        if how == "y += x":
            y += x
            return y
        if how == "torch.add":
            return torch.add(y, x)
        if how == "y.add_(x)":
            return y.add_(x)
        if how == "x - y":
            return x - y
        if how == "maximum":
            return torch.maximum(x, y)
        return torch.stack([x, y]).sum(0)

    return [Call(forward, branch=nn.Conv2d(channels, channels, rng.choice([1, 3]), padding="same"))]


def concatenation(rng: random.Random, channels: int) -> list[nn.Module]:
    return [Call(lambda self, x: torch.cat([x, self.branch(x)], dim=1), branch=nn.Conv2d(channels, 2, 1))]


def reshaping(rng: random.Random, channels: int) -> list[nn.Module]:
    widths = tuple(rng.randint(0, 2) for _ in range(2))
    mode = rng.choice(["constant", "reflect", "replicate", "circular"])
    size, resample = rng.choice([5, 7, 13]), rng.choice(["nearest", "bilinear"])
    corners = rng.random() < 0.5 if resample == "bilinear" else None

    def shuffle(self: Call, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w) if c % 2 == 0 else x

    def unpool(self: Call, x: torch.Tensor) -> torch.Tensor:
        return F.max_unpool2d(*F.max_pool2d(x, 2, return_indices=True), 2, output_size=x.shape[-2:])

    steps: list[Callable[[Call, torch.Tensor], torch.Tensor]] = [
        lambda self, x: F.pad(x, (*widths, *widths), mode=mode),
        lambda self, x: F.interpolate(x, size=size, mode=resample, align_corners=corners),
        shuffle,
        lambda self, x: x[:, :, 1:-1, 1:-1],
        lambda self, x: torch.cat(x.split([1, x.shape[1] - 1], dim=1)[::-1], dim=1),
        lambda self, x: torch.flip(x, dims=[3]),
        lambda self, x: torch.roll(x, 2, dims=2),
        lambda self, x: F.pixel_shuffle(x, 2) if x.shape[1] % 4 == 0 else F.pixel_unshuffle(x, 2),
        unpool,
        lambda self, x: x.contiguous(memory_format=torch.channels_last),
        lambda self, x: x.unsqueeze(1).expand(-1, 3, -1, -1, -1).sum(1) / 3,
        lambda self, x: x.repeat(1, 2, 1, 1),
        lambda self, x: x * rng_scale,
    ]
    rng_scale = rng.choice([2.0, -0.5])
    return [Call(rng.choice(steps))]


def with_parameters(rng: random.Random, channels: int) -> list[nn.Module]:
    weight = nn.Parameter(torch.randn(channels, channels, 3, 3) * 0.3)
    choices = [
        Call(lambda self, x: F.conv2d(x, self.weight, padding=1), weight=weight),
        Call(lambda self, x: torch.einsum("nchw,dc->ndhw", x, self.mix), mix=nn.Parameter(torch.randn(channels, channels) * 0.5)),
        Call(lambda self, x: self.dense(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), dense=nn.Linear(channels, channels)),
        Call(lambda self, x: torch.where(self.mask, x, 0.5 * x), mask=torch.rand(1, channels, 1, 1) > 0.5),
        nn.Sequential(nn.Conv2d(channels, channels, 1), nn.Identity(), nn.Dropout(0.3), nn.ReLU()),
    ]
    return [rng.choice(choices)]


IMAGE_BLOCKS = [conv, conv, transposed_conv, weight_normed_conv, activation, pooling, residual, concatenation, reshaping, reshaping, with_parameters]


def image_network(seed: int, first_is_conv: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """2-7 random blocks and a dense head; every block is kept only if the network still runs.

    ``first_is_conv``: the first block is a plain convolution (so that the first layer, whose
    rule may give relevance to zero inputs, sees the input itself).
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    x = torch.randn(IMAGE_SHAPE, dtype=torch.float64)
    blocks: list[nn.Module] = [nn.Conv2d(IMAGE_SHAPE[1], 4, 3, padding=1)] if first_is_conv else []
    probe = x if not blocks else blocks[0].double()(x)
    for _ in range(rng.randint(2, 7)):
        candidate = [module.double() for module in rng.choice(IMAGE_BLOCKS)(rng, probe.shape[1])]
        try:
            with torch.no_grad():
                out = nn.Sequential(*candidate).eval()(probe.clone())
        except (RuntimeError, ValueError, NotImplementedError):
            continue
        if out.ndim == 4 and min(out.shape[-2:]) >= 2 and out.numel() <= 4 * x.numel() and torch.isfinite(out).all():
            blocks += candidate
            probe = out
    head = nn.Linear(probe[0].numel(), 5).double()
    return nn.Sequential(*blocks, nn.Flatten(), head).eval(), x


# --------------------------------------------------------------------------------------------
# 1-D and 3-D blocks: (N, C, L) or (N, C, D, H, W)
# --------------------------------------------------------------------------------------------


def block_of_dims(rng: random.Random, dims: int, channels: int) -> list[nn.Module]:
    """A convolution (with BatchNorm), transposed convolution, weight-normed layer, pooling,
    resampling, padding, max unpooling, residual sum or concatenation in ``dims`` dimensions."""
    conv, transposed = {1: (nn.Conv1d, nn.ConvTranspose1d), 3: (nn.Conv3d, nn.ConvTranspose3d)}[dims]
    norm = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[dims]
    kind = rng.choice(["conv", "transposed", "weight_norm", "activation", "pool", "resample", "pad", "unpool", "residual", "cat"])
    if kind == "conv":
        kernel = rng.choice([1, 3])
        layer = conv(channels, rng.choice([2, 3, 4]), kernel, rng.choice([1, 2]), kernel // 2, padding_mode=rng.choice(["zeros", "reflect", "circular"]))
        return [layer, randomized_norm(norm(layer.out_channels), rng)]
    if kind == "transposed":
        groups = 2 if channels % 2 == 0 else 1
        return [transposed(channels, 2 * groups, 2, 2, groups=groups), randomized_norm(norm(2 * groups), rng)]
    if kind == "weight_norm":
        return [nn.utils.parametrizations.weight_norm(conv(channels, channels, 3, padding=1)), randomized_norm(norm(channels), rng)]
    if kind == "activation":
        return [rng.choice([nn.ReLU(), nn.LeakyReLU(0.2)])]
    if kind == "pool":
        pools = {1: (nn.MaxPool1d(2), nn.AvgPool1d(2), nn.AdaptiveMaxPool1d(3)), 3: (nn.MaxPool3d(2), nn.AvgPool3d(2), nn.AdaptiveAvgPool3d(3))}
        return [rng.choice(pools[dims])]
    if kind == "resample":
        mode = rng.choice(["nearest", "linear" if dims == 1 else "trilinear"])
        return [Call(lambda self, x: F.interpolate(x, scale_factor=2 if x.shape[-1] < 8 else 0.5, mode=mode))]
    if kind == "pad":
        width, mode = rng.randint(1, 2), rng.choice(["constant", "reflect", "replicate", "circular"])
        return [Call(lambda self, x: F.pad(x, (width, width) * dims, mode=mode))]
    if kind == "unpool":
        pool, unpool = (F.max_pool1d, F.max_unpool1d) if dims == 1 else (F.max_pool3d, F.max_unpool3d)
        return [Call(lambda self, x: unpool(*pool(x, 2, return_indices=True), 2, output_size=x.shape[2:]))]
    if kind == "residual":
        return [Call(lambda self, x: x + self.branch(x), branch=conv(channels, channels, 3, padding=1))]
    return [Call(lambda self, x: torch.cat([x, self.branch(x)], dim=1), branch=conv(channels, 2, 1))]


def network_of_dims(seed: int, dims: int) -> tuple[nn.Module, torch.Tensor]:
    """2-6 random blocks in ``dims`` dimensions and a dense head."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    x = torch.randn((2, 3, 12) if dims == 1 else (2, 3, 6, 6, 6), dtype=torch.float64)
    blocks: list[nn.Module] = []
    probe = x
    for _ in range(rng.randint(2, 6)):
        candidate = [module.double() for module in block_of_dims(rng, dims, probe.shape[1])]
        try:
            with torch.no_grad():
                out = nn.Sequential(*candidate).eval()(probe.clone())
        except (RuntimeError, ValueError, NotImplementedError):
            continue
        if min(out.shape[2:]) >= 2 and out.numel() <= 8 * x.numel() and torch.isfinite(out).all():
            blocks += candidate
            probe = out
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(probe[0].numel(), 4).double()).eval(), x


# --------------------------------------------------------------------------------------------
# sequence blocks: (N, L, D) to (N, L, D)
# --------------------------------------------------------------------------------------------


def attention(rng: random.Random) -> nn.Module:
    if rng.random() < 0.5:
        causal = rng.random() < 0.3

        def multihead(self: Call, x: torch.Tensor) -> torch.Tensor:
            mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1) if causal else None
            return x + self.attention(x, x, x, need_weights=False, attn_mask=mask)[0]

        return Call(multihead, attention=nn.MultiheadAttention(WIDTH, 2, bias=False, batch_first=True))
    causal = rng.random() < 0.5

    def scaled_dot_product(self: Call, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, 2, width // 2).permute(2, 0, 3, 1, 4)
        return x + F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(x.shape)

    return Call(scaled_dot_product, qkv=nn.Linear(WIDTH, 3 * WIDTH, bias=False))


def sequence_block(rng: random.Random) -> nn.Module:
    kind = rng.choice(["dense", "norm", "activation", "mlp", "attention", "attention", "gate", "swiglu", "conv", "scale", "mix"])
    if kind == "dense":
        return nn.Linear(WIDTH, WIDTH, bias=False)
    if kind == "norm":
        group_norm = nn.GroupNorm(2, WIDTH)
        nn.init.zeros_(group_norm.bias)
        return rng.choice([
            nn.LayerNorm(WIDTH, bias=False),
            nn.RMSNorm(WIDTH),
            Call(lambda self, x: self.norm(x.transpose(1, 2)).transpose(1, 2), norm=group_norm),
        ])
    if kind == "activation":
        return rng.choice([nn.GELU(), nn.SiLU(), nn.ReLU(), nn.Tanh(), nn.GELU("tanh"), nn.Mish()])
    if kind == "mlp":
        mlp = nn.Sequential(nn.LayerNorm(WIDTH, bias=False), nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH, bias=False))
        return Call(lambda self, x: x + self.mlp(x), mlp=mlp)
    if kind == "attention":
        return attention(rng)
    if kind == "gate":
        return Call(lambda self, x: x * torch.sigmoid(self.gate(x)), gate=nn.Linear(WIDTH, WIDTH, bias=False))
    if kind == "swiglu":
        def swiglu(self: Call, x: torch.Tensor) -> torch.Tensor:
            a, b = self.up(x).chunk(2, -1)
            return x + self.down(F.silu(a) * b)

        return Call(swiglu, up=nn.Linear(WIDTH, 2 * WIDTH, bias=False), down=nn.Linear(WIDTH, WIDTH, bias=False))
    if kind == "conv":
        depthwise = nn.Conv1d(WIDTH, WIDTH, 3, padding=1, groups=rng.choice([1, WIDTH]), bias=False)
        return Call(lambda self, x: self.conv(x.transpose(1, 2)).transpose(1, 2), conv=depthwise)
    if kind == "scale":
        return Call(lambda self, x: x + self.gamma * self.dense(x), gamma=nn.Parameter(torch.rand(WIDTH) * 0.5), dense=nn.Linear(WIDTH, WIDTH, bias=False))
    return Call(lambda self, x: x + torch.softmax(self.scores(x), -1) @ x, scores=nn.Linear(WIDTH, TOKENS + 1, bias=False))


class SequenceNetwork(nn.Module):
    """Optional token embedding, a class token, random blocks, pooling, a dense head (no biases)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, WIDTH) if rng.random() < 0.4 else None
        self.class_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.blocks = nn.Sequential(*(sequence_block(rng) for _ in range(rng.randint(2, 6))))
        self.pool = rng.choice(["mean", "first", "sum", "max"])
        self.head = nn.Linear(WIDTH, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        x = self.blocks(torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1))
        pooled = {"mean": lambda: x.mean(1), "first": lambda: x[:, 0], "sum": lambda: x.sum(1), "max": lambda: x.amax(1)}[self.pool]()
        return self.head(pooled)


def sequence_network(seed: int) -> tuple[nn.Module, torch.Tensor]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model = SequenceNetwork(rng).double().eval()
    x = torch.randint(0, VOCABULARY, (3, TOKENS)) if model.embedding is not None else torch.randn(3, TOKENS, WIDTH, dtype=torch.float64)
    return model, x


# --------------------------------------------------------------------------------------------
# modern image blocks: smooth activations, normalisations, gates (N, C, H, W) to (N, C', H', W')
# --------------------------------------------------------------------------------------------


def smooth_activation(rng: random.Random, channels: int) -> list[nn.Module]:
    """An activation a modern network uses, as a module or written out (no sigmoid or tanh on
    its own: a product of two gates' outputs has no signal to tell)."""
    return [rng.choice([
        nn.SiLU(), nn.Hardswish(), nn.GELU(), nn.Mish(), nn.ELU(), nn.ReLU6(), nn.Hardtanh(), nn.Softplus(),
        Call(lambda self, x: x * torch.sigmoid(x)), Call(lambda self, x: F.hardswish(x)),
        Call(lambda self, x: F.gelu(x, approximate="tanh")),
    ])]


def normalisation(rng: random.Random, channels: int) -> list[nn.Module]:
    groups = 2 if channels % 2 == 0 else 1
    return [rng.choice([
        randomized_norm(nn.BatchNorm2d(channels), rng),
        nn.GroupNorm(groups, channels),
        nn.InstanceNorm2d(channels, affine=True),
        Call(lambda self, x: self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), norm=nn.LayerNorm(channels)),
        Call(lambda self, x: F.layer_norm(x, x.shape[1:])),
    ])]


def squeeze_excitation(rng: random.Random, channels: int) -> list[nn.Module]:
    """``x * gate(fc(pool(x)))``: a sigmoid, hard sigmoid or softmax gate, broadcast over the pixels."""
    gate = rng.choice([torch.sigmoid, F.hardsigmoid, lambda scores: torch.softmax(scores, 1)])

    def excite(self: Call, x: torch.Tensor) -> torch.Tensor:
        return x * gate(self.expand(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))

    hidden = max(2, channels // 2)
    return [Call(excite, squeeze=nn.Conv2d(channels, hidden, 1), expand=nn.Conv2d(hidden, channels, 1))]


def convnext_block(rng: random.Random, channels: int) -> list[nn.Module]:
    """Depthwise 7x7, channels-last layer norm, an MLP of ``nn.Linear``, a layer scale, a residual sum."""

    def forward(self: Call, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.depthwise(x).permute(0, 2, 3, 1))
        y = self.gamma * self.down(F.gelu(self.up(y)))
        return x + y.permute(0, 3, 1, 2)

    return [Call(
        forward, depthwise=nn.Conv2d(channels, channels, 7, padding=3, groups=channels), norm=nn.LayerNorm(channels),
        up=nn.Linear(channels, 4 * channels), down=nn.Linear(4 * channels, channels), gamma=nn.Parameter(torch.rand(channels)),
    )]


def inverted_residual(rng: random.Random, channels: int) -> list[nn.Module]:
    """MobileNet's and EfficientNet's block: expand, depthwise, squeeze-and-excitation, project, add."""
    wide, act = 2 * channels, rng.choice([nn.SiLU, nn.Hardswish, nn.ReLU6])
    body = nn.Sequential(
        nn.Conv2d(channels, wide, 1, bias=False), randomized_norm(nn.BatchNorm2d(wide), rng), act(),
        nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False), randomized_norm(nn.BatchNorm2d(wide), rng), act(),
        *squeeze_excitation(rng, wide), nn.Conv2d(wide, channels, 1, bias=False), randomized_norm(nn.BatchNorm2d(channels), rng),
    )
    return [Call(lambda self, x: x + self.body(x), body=body)]


def spatial_gates(rng: random.Random, channels: int) -> list[nn.Module]:
    """CBAM's spatial attention (a gate broadcast over the channels), a GLU, or a scaled residual."""
    return [rng.choice([
        Call(lambda self, x: x * torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1))),
             conv=nn.Conv2d(2, 1, 3, padding=1)),
        Call(lambda self, x: F.glu(self.conv(x), dim=1), conv=nn.Conv2d(channels, 2 * channels, 1)),
        Call(lambda self, x: x + self.scale * self.conv(x), conv=nn.Conv2d(channels, channels, 3, padding=1),
             scale=nn.Parameter(torch.rand(channels, 1, 1))),
    ])]


def patch_attention(rng: random.Random, channels: int) -> list[nn.Module]:
    """The pixels as tokens: layer norm, ``nn.MultiheadAttention``, a residual sum, back to a map."""
    heads = 2 if channels % 2 == 0 else 1

    def forward(self: Call, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2).transpose(1, 2)
        normed = self.norm(tokens)
        tokens = tokens + self.attention(normed, normed, normed, need_weights=False)[0]
        return tokens.transpose(1, 2).reshape(x.shape)

    return [Call(forward, norm=nn.LayerNorm(channels), attention=nn.MultiheadAttention(channels, heads, batch_first=True))]


def plain_convolution(rng: random.Random, channels: int) -> list[nn.Module]:
    out = rng.choice([4, 6, 8])
    return [nn.Conv2d(channels, out, 3, padding=1, stride=rng.choice([1, 1, 2])), *normalisation(rng, out)]


MODERN_BLOCKS = [
    smooth_activation, normalisation, squeeze_excitation, convnext_block, inverted_residual, spatial_gates,
    patch_attention, plain_convolution, plain_convolution,
]


def modern_head(rng: random.Random, probe: torch.Tensor) -> list[nn.Module]:
    """Flatten and a dense layer, or global average pooling (with a layer norm, as ConvNeXt's head) and one."""
    channels = probe.shape[1]
    return rng.choice([
        [nn.Flatten(), nn.Linear(probe[0].numel(), 5)],
        [Call(lambda self, x: self.norm(x.mean((2, 3))), norm=nn.LayerNorm(channels)), nn.Linear(channels, 5)],
        [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5)],
    ])


def modern_image_network(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A convolution, 2-6 random modern blocks, a head."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    x = torch.randn(IMAGE_SHAPE, dtype=torch.float64)
    blocks: list[nn.Module] = [nn.Conv2d(IMAGE_SHAPE[1], 6, 3, padding=1).double()]
    probe = blocks[0](x)
    for _ in range(rng.randint(2, 6)):
        candidate = [module.double() for module in rng.choice(MODERN_BLOCKS)(rng, probe.shape[1])]
        with torch.no_grad():
            out = nn.Sequential(*candidate).eval()(probe.clone())
        if min(out.shape[-2:]) >= 2 and torch.isfinite(out).all():
            blocks += candidate
            probe = out
    return nn.Sequential(*blocks, *(module.double() for module in modern_head(rng, probe))).eval(), x


# --------------------------------------------------------------------------------------------
# language models written as transformers writes them: token ids to next-token logits
# --------------------------------------------------------------------------------------------

HEADS, KEY_VALUE_HEADS, HEAD_WIDTH = 4, 2, WIDTH // 4


class WrittenOutRMSNorm(nn.Module):
    """``weight * x * rsqrt(mean(x^2) + eps)``, as Llama's code writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(WIDTH) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def rotary(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embeddings: ``q cos + rotate_half(q) sin`` with constant angles."""
    positions = torch.arange(q.shape[-2], dtype=q.dtype)
    angles = torch.outer(positions, 1.0 / 10000 ** (torch.arange(0, HEAD_WIDTH, 2, dtype=q.dtype) / HEAD_WIDTH))
    angles = torch.cat((angles, angles), -1)
    cos, sin = angles.cos(), angles.sin()

    def rotate_half(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((-t[..., HEAD_WIDTH // 2:], t[..., : HEAD_WIDTH // 2]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention, keys and values repeated per group (``repeat_kv``), with a causal
    mask filled with ``-inf``, added as a large negative number, an ALiBi bias, a sliding window,
    or ``F.scaled_dot_product_attention``; rotary embeddings or none."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.q = nn.Linear(WIDTH, HEADS * HEAD_WIDTH, bias=False)
        self.k = nn.Linear(WIDTH, KEY_VALUE_HEADS * HEAD_WIDTH, bias=False)
        self.v = nn.Linear(WIDTH, KEY_VALUE_HEADS * HEAD_WIDTH, bias=False)
        self.o = nn.Linear(HEADS * HEAD_WIDTH, WIDTH, bias=False)
        self.rotary = rng.random() < 0.6
        self.mask = rng.choice(["fill", "add", "alibi", "window", "sdpa"])

    def heads(self, layer: nn.Linear, x: torch.Tensor, count: int) -> torch.Tensor:
        n, length, _ = x.shape
        return layer(x).view(n, length, count, HEAD_WIDTH).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = self.heads(self.q, x, HEADS), self.heads(self.k, x, KEY_VALUE_HEADS), self.heads(self.v, x, KEY_VALUE_HEADS)
        if self.rotary:
            q, k = rotary(q, k)
        repeat = HEADS // KEY_VALUE_HEADS
        k, v = (t[:, :, None].expand(n, KEY_VALUE_HEADS, repeat, length, HEAD_WIDTH).reshape(n, HEADS, length, HEAD_WIDTH) for t in (k, v))
        if self.mask == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(2, 3) / HEAD_WIDTH**0.5
            future = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
            if self.mask == "add":
                scores = scores + torch.zeros(length, length, dtype=scores.dtype).masked_fill(future, torch.finfo(scores.dtype).min)
            else:
                if self.mask == "alibi":
                    slopes = torch.tensor([2.0 ** (-8 * (head + 1) / HEADS) for head in range(HEADS)], dtype=scores.dtype)
                    scores = scores + slopes[:, None, None] * (torch.arange(length)[None] - torch.arange(length)[:, None])
                far = (torch.arange(length)[:, None] - torch.arange(length)[None]) >= 3 if self.mask == "window" else future
                scores = scores.masked_fill(future | far, float("-inf"))
            out = F.softmax(scores, dim=-1, dtype=torch.float64).to(q.dtype) @ v
        return self.o(out.transpose(1, 2).reshape(n, length, HEADS * HEAD_WIDTH))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU, GeGLU."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.gate, self.up = nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.down = nn.Linear(2 * WIDTH, WIDTH, bias=False)
        self.act = rng.choice([F.silu, F.gelu, lambda t: F.gelu(t, approximate="tanh")])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.gate(x)) * self.up(x))


class TopTwoExperts(nn.Module):
    """A router's softmax, the top two experts per token (renormalised or not), ``index_add_`` back (Mixtral)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.router = nn.Linear(WIDTH, 4, bias=False)
        self.experts = nn.ModuleList(GatedMLP(rng) for _ in range(4))
        self.renormalise = rng.random() < 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, WIDTH)
        weights, chosen = torch.topk(F.softmax(self.router(rows), dim=-1, dtype=torch.float64), 2, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(rows)
        routed = F.one_hot(chosen, num_classes=4).permute(2, 1, 0)
        for index, expert in enumerate(self.experts):
            slot, token = torch.where(routed[index])
            if token.numel():
                out.index_add_(0, token, (expert(rows[token]) * weights[token, slot, None]).to(rows.dtype))
        return out.reshape(x.shape)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP (or a mixture of experts), sequential or in parallel (GPT-J)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.norm1 = rng.choice([WrittenOutRMSNorm, lambda: nn.RMSNorm(WIDTH)])()
        self.norm2 = rng.choice([WrittenOutRMSNorm, lambda: nn.LayerNorm(WIDTH, bias=False)])()
        self.attention = GroupedQueryAttention(rng)
        self.mlp = TopTwoExperts(rng) if rng.random() < 0.4 else GatedMLP(rng)
        self.parallel = rng.random() < 0.2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            normed = self.norm1(x)
            return x + self.attention(normed) + self.mlp(normed)
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LanguageModel(nn.Module):
    """Embedding (scaled or not), 1-3 decoder layers, a final norm, the last token's logits from a
    head of its own or the embedding's weights (tied)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCABULARY, WIDTH)
        self.layers = nn.ModuleList(DecoderLayer(rng) for _ in range(rng.randint(1, 3)))
        self.norm = nn.RMSNorm(WIDTH)
        self.head = None if rng.random() < 0.5 else nn.Linear(WIDTH, VOCABULARY, bias=False)
        self.scale = WIDTH**0.5 if rng.random() < 0.3 else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids)
        if self.scale is not None:
            x = x * self.scale
        for layer in self.layers:
            x = layer(x)
        last = self.norm(x)[:, -1]
        return last @ self.embedding.weight.T if self.head is None else self.head(last)


def language_model(seed: int) -> tuple[nn.Module, torch.Tensor]:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    return LanguageModel(rng).double().eval(), torch.randint(0, VOCABULARY, (2, TOKENS))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def without_biases(model: nn.Module) -> nn.Module:
    """``model`` with every bias and BatchNorm mean zero (so that relevance is conserved)."""
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
    return model


def epsilon_everywhere(epsilon: float) -> composites.LayerMapComposite:
    return composites.LayerMapComposite(
        [*composites.layer_map_base(stabilizer=epsilon), (types.AnyLinear, rules.Epsilon(epsilon=epsilon))],
        canonizers=default_canonizers(stabilizer=epsilon),
    )


def explain_without_warnings(model: nn.Module, x: torch.Tensor, composite, target=None) -> tuple[torch.Tensor, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return Gradient(model, composite=composite)(x.clone(), target=target)


def state_of(model: nn.Module) -> tuple:
    """Everything an explanation must leave as it was."""
    modules = [
        (name, id(module), module.training, sorted(vars(module)), hooks_left(module))
        for name, module in model.named_modules()
    ]
    parameters = [(name, id(param), param._version) for name, param in model.named_parameters()]
    return {key: value.clone() for key, value in model.state_dict().items()}, modules, parameters


def assert_same_state(before: tuple, after: tuple) -> None:
    assert list(before[0]) == list(after[0])
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key
    assert before[1:] == after[1:]


def relative_sum_error(relevance: torch.Tensor, output: torch.Tensor) -> float:
    logits = output.max(dim=1).values
    sums = relevance.reshape(relevance.shape[0], -1).sum(dim=1)
    return float(((sums - logits).abs() / logits.abs()).max())


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

SEEDS = range(80)


@pytest.mark.parametrize("seed", SEEDS)
def test_lrp0_equals_gradient_times_input_on_random_piecewise_linear_networks(seed):
    assert_lrp0_is_gradient_times_input(*image_network(seed))


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("seed", range(30))
def test_lrp0_equals_gradient_times_input_in_one_and_three_dimensions(seed, dims):
    assert_lrp0_is_gradient_times_input(*network_of_dims(seed, dims))


def assert_lrp0_is_gradient_times_input(model: nn.Module, x: torch.Tensor) -> None:
    inputs = x.clone().requires_grad_(True)
    output = model(inputs)
    target = output.argmax(dim=1)
    (gradient,) = torch.autograd.grad(output.gather(1, target[:, None]).sum(), inputs)
    _, relevance = explain_without_warnings(model, x, epsilon_everywhere(0.0), target)
    expected = gradient * x
    torch.testing.assert_close(relevance, expected, rtol=0.0, atol=1e-9 * float(expected.abs().max()))


@pytest.mark.parametrize("seed", SEEDS)
def test_epsilon_gamma_box_conserves_on_random_networks_without_biases(seed):
    model, x = image_network(seed, first_is_conv=True)
    model = without_biases(model)
    composite = composites.EpsilonGammaBox(low=-5.0, high=5.0, epsilon=TINY, stabilizer=TINY)
    output, relevance = explain_without_warnings(model, x, composite)
    assert relative_sum_error(relevance, output) < 1e-8


@pytest.mark.parametrize("seed", SEEDS)
def test_epsilon_conserves_on_random_sequence_networks_without_biases(seed):
    model, x = sequence_network(seed)
    output, relevance = explain_without_warnings(model, x, epsilon_everywhere(TINY))
    if float(output.max(dim=1).values.abs().min()) < 1e-8:
        pytest.skip("the head reads the (zero) class token, which no block mixed with the others: logits 0")
    assert relative_sum_error(relevance, output) < 1e-8


@pytest.mark.parametrize("seed", range(40))
def test_epsilon_and_epsilon_gamma_box_conserve_on_random_modern_image_networks_without_biases(seed):
    model, x = modern_image_network(seed)
    model = without_biases(model)
    output, relevance = explain_without_warnings(model, x, epsilon_everywhere(TINY))
    if float(output.max(dim=1).values.abs().min()) < 1e-8:
        pytest.skip("logits of 1e-18: a normalisation without its shift leaves each channel a zero mean, and the head averages them")
    assert relative_sum_error(relevance, output) < 1e-8
    composite = composites.EpsilonGammaBox(low=-5.0, high=5.0, epsilon=TINY, stabilizer=TINY)
    output, relevance = explain_without_warnings(model, x, composite)
    assert relative_sum_error(relevance, output) < 1e-8


@pytest.mark.parametrize("seed", range(40))
def test_epsilon_conserves_on_random_language_models_without_biases(seed):
    model, ids = language_model(seed)
    output, relevance = explain_without_warnings(model, ids, epsilon_everywhere(TINY))
    assert relative_sum_error(relevance, output) < 1e-7


PRESETS = {
    "EpsilonPlusFlat": composites.EpsilonPlusFlat,
    "EpsilonGammaBox": lambda: composites.EpsilonGammaBox(low=-3.0, high=3.0),
    "EpsilonAlpha2Beta1": composites.EpsilonAlpha2Beta1,
    "EpsilonAlpha2Beta1Flat": composites.EpsilonAlpha2Beta1Flat,
    "ExcitationBackprop": composites.ExcitationBackprop,
    "GuidedBackprop": composites.GuidedBackprop,
}


NETWORKS = {"image": image_network, "sequence": sequence_network, "modern image": modern_image_network, "language model": language_model}


@pytest.mark.parametrize("kind", list(NETWORKS))
@pytest.mark.parametrize("seed", range(12))
def test_every_preset_runs_cleanly_and_leaves_the_model_as_it_was(seed, kind):
    model, x = NETWORKS[kind](seed)
    with torch.no_grad():
        expected = model(x)
    for name, make in PRESETS.items():
        before = state_of(model)
        output, relevance = explain_without_warnings(model, x, make())
        assert torch.isfinite(relevance).all(), name
        torch.testing.assert_close(output, expected, rtol=1e-12, atol=1e-12, msg=name)
        assert_same_state(before, state_of(model))
