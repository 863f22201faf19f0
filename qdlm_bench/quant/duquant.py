"""DuQuant (Lin et al., 2024) as reusable primitives: greedy block rotations, the zigzag permutation,
and the online transform they make.

Convention: a transform acts on row vectors, ``x -> x M``; for an orthogonal ``M`` a linear keeps
its output when its input is transformed and its weight rows too (``W -> W M``), so one module
transforms both. DuQuant's ``M = R1 P R2``:

* ``R1``, ``R2``: block-diagonal rotations (blocks of ``block_size`` channels, the last block
  shorter when it does not divide ``d``). Each block is built greedily on calibration tokens: at
  every step the channel holding the block's largest |x| is rotated by ``E_c R E_c`` (``E_c``
  swaps channel ``c`` and 0; ``R`` orthogonal with a uniform first row, so channel ``c`` is spread
  evenly over the block and the rest mixed by a random rotation); after ``steps`` steps each block
  keeps the prefix of steps with the smallest peak |x|;
* ``P``: a zigzag permutation: channels sorted by max|x| after ``R1`` are dealt to the blocks
  0, 1, .., K-1, K-1, .., 0, 0, 1, .. so every block gets a similar share of the outliers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .awq import TokenStats
from .smooth import ChannelMax


class OutlierStats:
    """A ``walk.collect`` statistic: per-channel max|x| (``ChannelMax``, for smoothing), an evenly
    strided sample of at most ``max_tokens`` tokens (``awq.TokenStats``) and the ``n_peak`` tokens
    with the largest max|x| (massive-outlier tokens a strided sample would miss), float32."""

    def __init__(self, dim: int, total_tokens: int, max_tokens: int = 512, n_peak: int = 32, device=None):
        self.channel = ChannelMax(dim, device)
        self.sample = TokenStats(dim, total_tokens, max_tokens, device)
        self.n_peak = n_peak
        self.peaks = torch.zeros(0, dim, device=device)

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        self.channel.add(x, weights)
        self.sample.add(x, weights)
        x = x.reshape(-1, x.shape[-1]).float()
        if weights is not None:
            x = x[weights.reshape(-1) > 0]
        pool = torch.cat([self.peaks, x])
        self.peaks = pool[pool.abs().amax(-1).topk(min(self.n_peak, len(pool))).indices]

    @property
    def max(self) -> torch.Tensor:
        return self.channel.max

    @property
    def x(self) -> torch.Tensor:
        """The sampled tokens (padding left out) and the peak tokens, ``[T, dim]``."""
        return torch.cat([self.sample.x[self.sample.w > 0], self.peaks])


def spreading_rotation(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random ``n x n`` orthogonal matrix whose first row is ``1/sqrt(n)`` everywhere: the
    Householder reflection taking ``e_0`` to the uniform unit vector, its other rows mixed by
    a random rotation ``Q'`` (``diag(1, Q') H``), float32 on the CPU."""
    if n == 1:
        return torch.ones(1, 1)
    v = torch.full((n,), -1 / math.sqrt(n))
    v[0] += 1
    H = torch.eye(n) - 2 * torch.outer(v, v) / v.dot(v)
    Q = torch.eye(n)
    Q[1:, 1:] = torch.linalg.qr(torch.randn(n - 1, n - 1, generator=generator))[0]
    return Q @ H


@torch.no_grad()
def greedy_rotation(x: torch.Tensor, steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy rotations ``[n, b, b]`` of the blocks of ``x`` ``[T, n, b]`` (tokens, blocks, channels),
    float32 on ``x``'s device: block ``k`` of ``x @ R[k]`` has the smallest peak |x| over the
    first 0..``steps`` greedy steps (the product of steps, snapped back to the nearest orthogonal
    matrix in float64 so that float32 drift does not break the FP equivalence)."""
    x = x.float()
    _, n, b = x.shape
    base = spreading_rotation(b, generator).to(x.device)
    rows = torch.arange(n, device=x.device)
    R = torch.eye(b, device=x.device).repeat(n, 1, 1)
    channel_max = x.abs().amax(0)  # [n, b]
    best, best_peak = R.clone(), channel_max.amax(-1)
    for _ in range(steps):
        c = channel_max.argmax(-1)  # each block's outlier channel
        swap = torch.arange(b, device=x.device).repeat(n, 1)
        swap[rows, c], swap[rows, 0] = 0, c
        step = base[swap[:, :, None], swap[:, None, :]]  # E_c base E_c per block
        x = torch.einsum("tnb,nbc->tnc", x, step)
        R = torch.bmm(R, step)
        channel_max = x.abs().amax(0)
        peak = channel_max.amax(-1)
        better = peak < best_peak
        best = torch.where(better[:, None, None], R, best)
        best_peak = torch.minimum(peak, best_peak)
    U, _, Vh = torch.linalg.svd(best.double())  # the nearest orthogonal matrices: undo float32 drift
    return (U @ Vh).float()


def block_rotation(x: torch.Tensor, block_size: int, steps: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy block-diagonal rotation of ``x`` ``[T, d]`` as ``[ceil(d / b), b, b]`` blocks with
    ``b = min(block_size, d)``; a shorter last block of ``r`` channels sits in the top-left corner
    of an identity (see ``apply_blocks``)."""
    d = x.shape[-1]
    b = min(block_size, d)
    n, r = divmod(d, b)
    blocks = [greedy_rotation(x[:, :n * b].unflatten(-1, (n, b)), steps, generator)]
    if r:
        tail = torch.eye(b, device=x.device)
        tail[:r, :r] = greedy_rotation(x[:, None, n * b:], steps, generator)[0]
        blocks.append(tail[None])
    return torch.cat(blocks)


def apply_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(blocks)`` over the last dim of ``x`` ``[..., d]`` (zero-padded to whole
    blocks and cut back, so a shorter last block acts on its own channels only), in float32 or
    ``x``'s dtype if wider."""
    n, b, _ = blocks.shape
    d = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = nn.functional.pad(x.to(dtype), (0, n * b - d)).unflatten(-1, (n, b))
    return torch.einsum("...nb,nbc->...nc", x, blocks.to(dtype)).flatten(-2)[..., :d]


def zigzag_permutation(channel_max: torch.Tensor, block_size: int) -> torch.Tensor:
    """``perm`` with ``x[..., perm]`` the channels dealt, by decreasing ``channel_max``, to the blocks
    in zigzag order (0, 1, .., K-1, K-1, .., 0, 0, ..), skipping full blocks (a shorter last
    block fills up early); within a block channels keep decreasing order."""
    d = channel_max.numel()
    sizes = [min(block_size, d - start) for start in range(0, d, block_size)]
    order = torch.argsort(channel_max, descending=True).tolist()
    zigzag = list(range(len(sizes))) + list(range(len(sizes) - 1, -1, -1))
    blocks, i = [[] for _ in sizes], 0
    for channel in order:
        while len(blocks[zigzag[i % len(zigzag)]]) == sizes[zigzag[i % len(zigzag)]]:
            i += 1
        blocks[zigzag[i % len(zigzag)]].append(channel)
        i += 1
    return torch.tensor([c for blk in blocks for c in blk], device=channel_max.device)


class DuQuantTransform(nn.Module):
    """The online input transform ``x -> ((x R1)[..., perm]) R2``: an orthogonal ``M``, so a linear's
    weight rows take the same transform (``W -> W M``, ``transform(W)``). Computed in float32,
    returned in the input's dtype."""

    def __init__(self, r1: torch.Tensor, perm: torch.Tensor, r2: torch.Tensor):
        super().__init__()
        self.register_buffer("r1", r1)
        self.register_buffer("perm", perm)
        self.register_buffer("r2", r2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_blocks(apply_blocks(x, self.r1)[..., self.perm], self.r2).to(x.dtype)

    def extra_repr(self) -> str:
        n, b, _ = self.r1.shape
        return f"dim={self.perm.numel()}, blocks={n}x{b}"


@torch.no_grad()
def fit_transform(x: torch.Tensor, block_size: int = 128, steps: int = 256,
                  generator: torch.Generator | None = None) -> DuQuantTransform:
    """DuQuant's rotation, zigzag permutation and second rotation for inputs ``x`` ``[T, d]``."""
    if block_size < 1 or steps < 0:
        raise ValueError(f"DuQuant needs block_size >= 1 and steps >= 0, got {block_size} and {steps}")
    x = x.float()
    r1 = block_rotation(x, block_size, steps, generator)
    x = apply_blocks(x, r1)
    perm = zigzag_permutation(x.abs().amax(0), min(block_size, x.shape[-1]))
    r2 = block_rotation(x[:, perm], block_size, steps, generator)
    return DuQuantTransform(r1, perm, r2)
