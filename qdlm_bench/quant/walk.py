"""The block walk shared by every calibrated method.

Blocks are processed one at a time on cached block inputs ``[N, L, d]``: for each block, the
statistics of each *subset* of linears (the linears that read the same input) are accumulated
over all calibration samples through a forward hook, the method's ``fn`` quantizes the subset,
and the block's outputs are recomputed with the QUANTIZED block to become the next block's
inputs (as GPTQ does). Memory holds the cached inputs/outputs plus one statistic per subset
(e.g. a ``d x d`` Hessian), never the O(N L d) inputs of every linear.

True-sequential (GPTQ's ``--true-sequential``): subsets are quantized in order, and the
inputs of each subset are collected after the previous subsets are quantized.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

# Linears sharing one input, in forward (= true-sequential) order, and the op that feeds each
# subset (the norm or linear whose output is that input; where AWQ folds its scales).
SUBSETS: list[list[str]] = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
FEEDERS: list[str] = ["attn_norm", "v_proj", "mlp_norm", "up_proj"]


@torch.no_grad()
def block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Inputs of the first block (the embeddings), ``[N, L, d]`` on the model's device and dtype."""
    dev = model.device
    return torch.cat([model.embed(input_ids[i:i + batch_size].to(dev)) for i in range(0, len(input_ids), batch_size)])


class Batches:
    """Batch slices of the calibration set with their block context and per-token weights."""

    def __init__(self, model, calib, batch_size: int, token_weights: torch.Tensor | None):
        self.model, self.bs = model, batch_size
        self.ids = calib.input_ids
        self.mask = getattr(calib, "attention_mask", None)
        self.token_weights = token_weights

    def __iter__(self):
        dev = self.model.device
        for i in range(0, len(self.ids), self.bs):
            s = slice(i, i + self.bs)
            am = None if self.mask is None else self.mask[s].to(dev)
            ctx = self.model.block_context(self.ids[s].to(dev), am)
            w = None if self.token_weights is None else self.token_weights[s].to(dev).float()
            if am is not None:  # padding never enters the statistics
                w = am.float() if w is None else w * am.float()
            yield s, ctx, w


@torch.no_grad()
def run_block(block: nn.Module, xs: torch.Tensor, batches: Batches) -> torch.Tensor:
    """The block's outputs over all cached inputs."""
    out = torch.empty_like(xs)
    for s, ctx, _ in batches:
        out[s] = block(xs[s], *ctx)
    return out


@torch.no_grad()
def collect(block: nn.Module, xs: torch.Tensor, batches: Batches, subsets: list[list[str]],
            make_stat: Callable[[nn.Module], object]) -> dict[str, object]:
    """Run the block over all inputs; for each subset, one statistic (``make_stat(first linear)``,
    fed ``stat.add(x, weights)`` with the subset's input) shared by every linear of the subset.
    Returns ``{linear name: stat}``."""
    stats, hooks, current = {}, [], {}
    for names in subsets:
        stat = make_stat(getattr(block, names[0]))
        stats.update(dict.fromkeys(names, stat))
        hooks.append(getattr(block, names[0]).register_forward_hook(
            lambda m, args, out, stat=stat: stat.add(args[0], current["w"])))
    try:
        for s, ctx, w in batches:
            current["w"] = w
            block(xs[s], *ctx)
    finally:
        for h in hooks:
            h.remove()
    return stats


@torch.no_grad()
def walk_blocks(model: nn.Module, calib, fn: Callable[[int, nn.Module, dict[str, object]], None],
                make_stat: Callable[[nn.Module], object], batch_size: int = 8, true_sequential: bool = True,
                token_weights: torch.Tensor | None = None, progress: bool = True) -> None:
    """Quantize ``model`` block by block on ``calib.input_ids`` ``[N, L]`` (optional ``calib.attention_mask``).

    ``fn(block_index, block, stats)`` quantizes the linears named in ``stats`` (``{name: stat}``,
    one subset at a time when ``true_sequential``, else all seven at once) in place.
    ``token_weights`` ``[N, L]`` (optional) weight each token's contribution to the statistics.
    """
    batches = Batches(model, calib, batch_size, token_weights)
    xs = block_inputs(model, calib.input_ids, batch_size)
    groups = [[s] for s in SUBSETS] if true_sequential else [SUBSETS]
    for i, block in enumerate(tqdm(model.blocks, desc="blocks", disable=not progress)):
        for subsets in groups:
            fn(i, block, collect(block, xs, batches, subsets, make_stat))
        xs = run_block(block, xs, batches)
