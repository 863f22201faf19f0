"""TMAS (DLLMQuant's Temporal-Mask Adaptive Sampling): calibration samples drawn from the FP
model's own sampling trajectories.

The FP model generates ``generation.gen_length`` tokens after each prompt (the rows of a prompt
calibration set, ``calib.source=prompts:<task>``) with its family's sampler
(``diffusion.generate``: LLaDA blocks + low-confidence remasking, Dream's timestep algorithm).
Every forward pass of the sampler sees one *snapshot*: the prompt and the generation so far,
undecoded tokens masked. Decoded tokens are never remasked, so a trajectory is stored as its
final tokens and, per generated position, the number of passes that saw it masked: snapshot
``c`` masks exactly the positions whose count exceeds ``c``.

Each snapshot has a place u in [0, 1) along its trajectory (``segment_by``): ``mask_ratio``
(1 - the masked fraction of the generation), ``block_step`` (the pass's index within its LLaDA
block / the block's passes; Dream has one block) or ``global_step`` (pass index / passes).
Segment ``k = floor(u K)``, ``K = len(proportions)``. ``sampling``: ``quota`` draws
``round(N p_k)`` snapshots from segment k (largest remainders), ``uniform`` N from all
snapshots, ``text`` N finished sequences (nothing masked). A pool is drawn without replacement
while it lasts. The rows carry their mask flags, mask ratio and the FP model's confidences,
and are cached on disk under a hash of the prompts, the model's weights and this config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qdlm_bench import calibration
from qdlm_bench.calibration import CalibSet
from qdlm_bench.diffusion import chunks, generate, pad_rows, pad_token_id
from qdlm_bench.generation import GenerationConfig

if TYPE_CHECKING:
    from . import TMASOptions

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: samplers and confidences read the unmodified distribution


@dataclasses.dataclass
class Trajectories:
    """Per prompt ``p``: ``prompts[p]`` (token ids), ``gen[p]`` [G] the generated tokens and
    ``passes[p]`` [G] how many forward passes saw each generated position masked.
    ``block_length``: the sampler's block (LLaDA), else G."""

    prompts: list[list[int]]
    gen: torch.Tensor
    passes: torch.Tensor
    block_length: int

    def snapshots(self) -> torch.Tensor:
        """``[S, 2]`` (prompt, pass) of every snapshot, in trajectory order."""
        n = self.passes.amax(1)
        return torch.cat([torch.stack([torch.full((int(c),), p), torch.arange(int(c))], 1) for p, c in enumerate(n)])

    def finished(self) -> torch.Tensor:
        """``[P, 2]`` (prompt, pass after the last): every sequence with nothing masked."""
        return torch.stack([torch.arange(len(self.prompts)), self.passes.amax(1)], 1)

    def segments(self, k: int, segment_by: str) -> torch.Tensor:
        """Segment ``floor(u k)`` in ``[0, k)`` of each of ``snapshots()`` (see the module doc), in
        exact integer arithmetic."""
        out = []
        for passes in self.passes:
            c = torch.arange(int(passes.max()))
            masked = passes[None, :] > c[:, None]  # [passes, G]
            if segment_by == "mask_ratio":
                num, den = masked.shape[1] - masked.sum(1), masked.shape[1]
            elif segment_by == "global_step":
                num, den = c, len(c)
            else:  # block_step: blocks are decoded in order; a pass's block is that of its first mask
                block = masked.long().argmax(1) // self.block_length
                first = torch.searchsorted(block, block)
                num, den = c - first, torch.searchsorted(block, block, right=True) - first
            out.append(k * num // den)
        return torch.cat(out)

    def rows(self, snaps: torch.Tensor, mask_id: int, pad_id: int) -> CalibSet:
        """The snapshots as a left-padded CalibSet (ids, mask flags, mask ratio of the generation)."""
        ids, flags = [], []
        for p, c in snaps.tolist():
            masked = self.passes[p] > c
            prompt = torch.tensor(self.prompts[p], dtype=torch.long)
            ids.append(torch.cat([prompt, self.gen[p].masked_fill(masked, mask_id)]))
            flags.append(torch.cat([torch.zeros_like(prompt, dtype=torch.bool), masked]))
        ids, attn = pad_rows(ids, pad_id, left=True)
        flags, _ = pad_rows(flags, False, left=True)
        ratio = torch.stack([(self.passes[p] > c).float().mean() for p, c in snaps.tolist()])
        return CalibSet(ids, flags, ratio, attention_mask=attn)


def trajectories(model, prompts: list[list[int]], cfg: GenerationConfig, batch_size: int = 8,
                 generator: torch.Generator | None = None) -> Trajectories:
    """Sample every prompt with the model's sampler (``diffusion.generate``), recording its trajectory."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    gen = torch.empty(len(prompts), cfg.gen_length, dtype=torch.long)
    passes = torch.empty_like(gen)
    mask_id = model.config.mask_token_id
    for idx in chunks(order, batch_size):
        # the first pass sees every generated position masked; each later one, what the step before left
        counts = torch.ones(len(idx), cfg.gen_length, dtype=torch.long, device=model.device)

        def on_step(step, x, counts=counts):
            counts += x[:, -cfg.gen_length:] == mask_id

        # idx is sorted by length, so generate's own (stable) sort keeps it as the batch order
        out = generate(model, [prompts[i] for i in idx], cfg, batch_size=len(idx), generator=generator,
                       on_step=on_step)
        gen[idx], passes[idx] = torch.tensor(out), counts.cpu()
    sampler = cfg.sampler or model.config.family
    return Trajectories(prompts, gen, passes, cfg.block_length if sampler == "llada" else cfg.gen_length)


def quotas(n: int, proportions: tuple[float, ...]) -> list[int]:
    """``round(n p_k)`` per segment, by largest remainders, summing to ``n``."""
    exact = [n * p for p in proportions]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])
    for k in by_remainder[:n - sum(counts)]:
        counts[k] += 1
    return counts


def take(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` items of ``pool`` in random order: without replacement while the pool lasts, then again."""
    if n > len(pool):
        log.warning("TMAS: %d samples from a pool of %d snapshots; some are drawn twice", n, len(pool))
    reps = -(-n // len(pool))
    return torch.cat([pool[torch.randperm(len(pool), generator=gen)] for _ in range(reps)])[:n]


def draw(segments: torch.Tensor, n: int, proportions: tuple[float, ...], gen: torch.Generator) -> torch.Tensor:
    """Indices of ``n`` snapshots, ``quotas(n, proportions)[k]`` of them from segment ``k``."""
    out = []
    for k, q in enumerate(quotas(n, proportions)):
        pool = (segments == k).nonzero().squeeze(1)
        if q and not len(pool):
            raise ValueError(f"TMAS segment {k} of {len(proportions)} holds no snapshot; use more prompts "
                             "or sampler steps, or fewer segments (tmas proportions)")
        if q:
            out.append(take(pool, q, gen))
    return torch.cat(out)


def weights_fingerprint(model, sample: int = 4096) -> str:
    """sha256 of the model config and, per state-dict tensor, its name, shape, dtype and an evenly
    strided sample of at most ``sample`` values (cheap for 8B models; trained weights differ everywhere)."""
    h = hashlib.sha256(repr(model.config).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().flatten()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::max(1, flat.numel() // sample)][:sample].float().cpu().numpy().tobytes())
    return h.hexdigest()


def prompt_rows(calib: CalibSet) -> list[list[int]]:
    """The unpadded rows of a clean calibration set."""
    if calib.masked.any():
        raise ValueError("TMAS prompts must be clean text: set calib.masking=none")
    if calib.attention_mask is None:
        return calib.input_ids.tolist()
    return [row[am.bool()].tolist() for row, am in zip(calib.input_ids, calib.attention_mask)]


def build(model, prompts: CalibSet, cfg: TMASOptions, batch_size: int = 8,
          cache_dir: str | Path | None = ".cache/calib") -> CalibSet:
    """The TMAS calibration set of the (FP) ``model`` on the rows of ``prompts``, with confidences;
    loaded from ``cache_dir`` when built before (None: no cache)."""
    rows = prompt_rows(prompts)
    parts = {"version": CACHE_VERSION, "cfg": dataclasses.asdict(cfg), "model": weights_fingerprint(model),
             "prompts_sha256": hashlib.sha256(json.dumps(rows).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    file = Path(cache_dir) / f"tmas-{key[:16]}.pt" if cache_dir is not None else None
    if file is not None and file.is_file():
        log.info("TMAS: loaded cached set %s", file)
        return calibration.load(file, key)
    traj = trajectories(model, rows, cfg.gen_config, batch_size,
                        torch.Generator(device=model.device).manual_seed(cfg.seed))
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.sampling == "text":
        chosen = take(traj.finished(), cfg.n_samples, gen)
    else:
        snaps, k = traj.snapshots(), len(cfg.proportions)
        segments = traj.segments(k, cfg.segment_by)
        idx = draw(segments, cfg.n_samples, cfg.proportions, gen) if cfg.sampling == "quota" else \
            take(torch.arange(len(snaps)), cfg.n_samples, gen)
        chosen = snaps[idx]
        log.info("TMAS: %d snapshots of %d trajectories; drawn per segment (%s): %s", len(snaps), len(rows),
                 cfg.segment_by, torch.bincount(segments[idx], minlength=k).tolist())
    calib = traj.rows(chosen, model.config.mask_token_id, pad_token_id(model))
    calib = dataclasses.replace(calib, key=key, confidence=calibration.confidences(model, calib, batch_size))
    if file is not None:
        calibration.save(calib, file, cfg=dataclasses.asdict(cfg))
        log.info("TMAS: cached %d x %d at %s", *calib.input_ids.shape, file)
    return calib
