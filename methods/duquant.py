"""DuQuant (Lin et al., 2024): smoothing, then rotation + zigzag permutation + rotation of each input.

Per block, on the FP block's inputs (the outputs of the already-quantized previous blocks), for
each subset whose input is named in ``quant.act_layers`` (quantized when ``a < 16``; at weight-only
bits the transforms still apply, activations stay in full precision, which measures what the
rotated, smoothed weights cost alone):

1. smoothing ``s = max|x|^alpha / max|W|^(1-alpha)`` folded into the preceding norm / linear
   (``quant.smooth_block``; skipped for v_proj -> o_proj under GQA, where v_proj cannot absorb it);
2. ``M = R1 P R2`` fitted on the smoothed calibration tokens, folded into the weights
   (``W -> W M``, ``M`` orthogonal) and run online as the ``QuantLinear`` input transform
   (``quant.BlockRotation``: two block-diagonal matmuls and a gather). No preceding op can absorb
   ``M``: a norm's weight is a per-channel scale, SwiGLU's product (down_proj's input) is
   elementwise, and attention mixes V within heads while ``P`` crosses heads (o_proj's input);
3. weights round-to-nearest with clip ratio ``swc`` (null = none); activations per-token with clip
   ratio ``lac`` (null = ``quant.act_clip_ratio``; otherwise setting both is an error).

Grid (``GRID``; weights, activations and K/V alike): the reference's ``UniformAffineQuantizer``
(Hsu1023/DuQuant ``quantize/quantizer.py``, ``per_token_dynamic_calibration`` / ``fake_quant``):
the range ``[min x, max x]`` (0 not included) times the clip ratio; symmetric
``max|x| / (2^(b-1) - 1)`` with the extra code positive. Clipping as the reference: fixed ratios
``swc`` / ``lac`` on both ends, no search; its learned clipping (``--lwc``, which needs training
epochs; a set ``swc`` takes precedence in its quantizer, as in its run script) is not implemented.
The reference quantizes K/V without ``lac``, activations always asymmetric and weights asymmetric
unless ``--symmetric``; here the spec's sym/asym choices stand.

The transform (convention: row vectors, ``x -> x M``):

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

import dataclasses
import math
from typing import Annotated

from pydantic import Field

from qdlm_bench import quant
from qdlm_bench.lazy import lazy_import, no_grad

from . import options, register

torch = lazy_import("torch")

Ratio = Annotated[float, Field(gt=0, le=1)]
GRID = "duquant"


@options
class DuQuantOptions:
    """``conf/method/duquant.yaml``."""

    alpha: Annotated[float, Field(ge=0, le=1)] = 0.6
    block_size: Annotated[int, Field(ge=1)] = 128
    steps: Annotated[int, Field(ge=0)] = 256
    lac: Ratio | None = 0.9
    swc: Ratio | None = 0.8
    max_tokens: Annotated[int, Field(ge=1)] = 512
    n_peak: Annotated[int, Field(ge=0)] = 32
    seed: int = 0
    batch_size: Annotated[int, Field(ge=1)] = 8


class OutlierStats:
    """A ``walk.collect`` statistic: per-channel max|x| (``ChannelMax``, for smoothing), an evenly
    strided sample of at most ``max_tokens`` tokens (``TokenStats``) and the ``n_peak`` tokens
    with the largest max|x| (massive-outlier tokens a strided sample would miss), float32."""

    def __init__(self, dim: int, total_tokens: int, max_tokens: int = 512, n_peak: int = 32, device=None):
        self.channel = quant.ChannelMax(dim, device)
        self.sample = quant.TokenStats(dim, total_tokens, max_tokens, device)
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


@no_grad
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
    of an identity (see ``quant.apply_blocks``)."""
    d = x.shape[-1]
    b = min(block_size, d)
    n, r = divmod(d, b)
    blocks = [greedy_rotation(x[:, :n * b].unflatten(-1, (n, b)), steps, generator)]
    if r:
        tail = torch.eye(b, device=x.device)
        tail[:r, :r] = greedy_rotation(x[:, None, n * b:], steps, generator)[0]
        blocks.append(tail[None])
    return torch.cat(blocks)


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


@no_grad
def fit_transform(x: torch.Tensor, block_size: int = 128, steps: int = 256,
                  generator: torch.Generator | None = None) -> quant.BlockRotation:
    """DuQuant's rotation, zigzag permutation and second rotation for inputs ``x`` ``[T, d]``."""
    if block_size < 1 or steps < 0:
        raise ValueError(f"DuQuant needs block_size >= 1 and steps >= 0, got {block_size} and {steps}")
    x = x.float()
    r1 = block_rotation(x, block_size, steps, generator)
    x = quant.apply_blocks(x, r1)
    perm = zigzag_permutation(x.abs().amax(0), min(block_size, x.shape[-1]))
    r2 = block_rotation(x[:, perm], block_size, steps, generator)
    return quant.BlockRotation(r1, perm, r2)


@no_grad
def transform_block(block, stats: dict, alpha: float, selected, wanted, block_size: int = 128,
                    steps: int = 256, generator=None) -> dict:
    """Smooth and rotate every subset of ``block`` holding a ``wanted(name)`` linear: its
    ``selected(name)`` linears get the transform folded into their weights and installed as
    their online input transform (``QuantLinear`` with nothing quantized yet). The FP function
    is unchanged. Returns ``{name: BlockRotation}``."""
    scales = quant.smooth_block(block, {n: st.max for n, st in stats.items()}, alpha, wanted)
    found = {}
    for names in quant.SUBSETS:
        if not any(wanted(n) for n in names):
            continue
        x = stats[names[0]].x
        T = fit_transform(x / scales[names[0]] if names[0] in scales else x, block_size, steps, generator)
        for name in filter(selected, names):
            layer = getattr(block, name)
            layer.weight.copy_(T(layer.weight))
            setattr(block, name, quant.QuantLinear(layer, quant.QuantSpec(), T))
            found[name] = T
    return found


@register("duquant", DuQuantOptions, calibration=True)
def quantize_weights(state, opts: DuQuantOptions) -> dict:
    """Transform and round the target weights; sets DuQuant's grid and the activation clip ratio
    ``lac`` on ``state.spec`` for ``install_quantizers``."""
    spec = state.spec
    selected, wanted = quant.act_selection(state.model, spec)
    if spec.a_clip_ratio != 1.0 and opts.lac is not None:
        raise ValueError(f"duquant sets the activation clip ratio with method.lac ({opts.lac}); quant.act_clip_ratio="
                         f"{spec.a_clip_ratio} conflicts: leave it at 1.0 or set method.lac=null")
    gen = torch.Generator().manual_seed(opts.seed)
    total = state.calib.input_ids.numel()
    done, transformed = [], []

    def fn(i, block, stats):
        transforms = transform_block(block, stats, opts.alpha, lambda n: selected(i, n), lambda n: wanted(i, n),
                                     opts.block_size, opts.steps, gen)
        transformed.extend(f"blocks.{i}.{n}" for n in transforms)
        for name in stats:
            if selected(i, name):
                layer = getattr(block, name)
                layer.weight.copy_(quant.fake_quant(layer.weight, spec.w_bits, spec.w_sym, spec.group_size,
                                                    opts.swc or 1.0, GRID))
                done.append(f"blocks.{i}.{name}")

    quant.walk_blocks(state.model, state.calib, fn,
                      lambda layer: OutlierStats(layer.in_features, total, opts.max_tokens, opts.n_peak,
                                                 layer.weight.device),
                      batch_size=opts.batch_size, true_sequential=False)
    state.spec = dataclasses.replace(spec, a_grid=GRID, a_clip_ratio=opts.lac or spec.a_clip_ratio)
    return {"layers": len(done), "transformed": len(transformed)}
