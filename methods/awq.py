"""AWQ (Lin et al., 2024): activation-aware scales folded into the preceding op, then clip search.

Follows the reference (mit-han-lab ``llm-awq``, ``auto_scale`` / ``auto_clip``). Per block, on the FP
block's inputs (the outputs of the already-quantized previous blocks):

* scale search: for each subset of linears sharing an input ``X`` (attn_norm->q/k/v, v_proj->o_proj
  when shapes allow (no GQA), mlp_norm->gate/up, up_proj->down_proj), ``s = mean|X|^alpha``
  normalized by ``sqrt(max(s) min(s))``, alpha on a grid of ``n_grid`` points in ``[0, 1)``,
  searched on the FP weights; the loss is the subset's output error
  ``sum_l ||Q(W_l diag(s)) (X / s) - W_l X||^2`` (alpha = 0 is RTN, and it is on the grid, so the
  search never does worse than RTN on its own loss);
* folding: every subset's scales are folded (``quant.fold_scales``: the feeder divided by ``s``, the
  subset's weight columns multiplied by it; the FP function is unchanged);
* clip search (q/k skipped, as the reference): per output channel group, clamp the weights to
  ``±r max|w|`` for ``r = 1 - i / n_grid``, ``i < max_shrink n_grid`` (1, 0.95, .., 0.55) and keep
  the ``r`` minimizing that group's output error on sampled tokens; then every target linear is
  clamped and fake-quantized.

Grid (``GRID``): the reference's asymmetric ``pseudo_quantize_tensor`` (``awq/quantize/quantizer.py``)
is the shared asymmetric grid for every group holding both signs (a one-signed group, which the
reference maps onto its own min..max and ours onto a range including 0, does not occur in real
weights); its symmetric branch is unused there ("we actually never used this"), so symmetric
weights follow GPTQ/AutoGPTQ's grid, as RTN's and GPTQ's. Every loss takes optional per-token
weights ``[T]`` (padding masks, DLLMQuant's CGQ).
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import Field

from qdlm_bench import quant
from qdlm_bench.lazy import lazy_import, no_grad

from . import options, register

torch = lazy_import("torch")

NO_CLIP = ("q_proj", "k_proj")
GRID = "gptq"


@options
class AWQOptions:
    """``conf/method/awq.yaml``."""

    n_grid: Annotated[int, Field(ge=1)] = 20
    clip: bool = True
    max_tokens: Annotated[int, Field(ge=1)] = 4096
    batch_size: Annotated[int, Field(ge=1)] = 8


def _out_error(weights: list[torch.Tensor], deltas: list[torch.Tensor], x: torch.Tensor,
               token_weight: torch.Tensor | None) -> float:
    """``sum_l mean_t w_t ||D_l x_t||^2`` (weighted mean over tokens)."""
    tw = torch.ones(len(x), device=x.device) if token_weight is None else token_weight.float()
    tw = tw / tw.sum().clamp(min=1e-12)
    return sum((tw @ (x @ d.T).pow(2)).sum().item() for d in deltas)


@no_grad
def search_scale(weights: list[torch.Tensor], x: torch.Tensor, x_mean: torch.Tensor, bits: int, sym: bool,
                 group_size: int | None, n_grid: int = 20, token_weight: torch.Tensor | None = None):
    """Best AWQ input scale for linears ``weights`` (each ``[out_l, d]``) reading ``x`` ``[T, d]``.

    Returns ``(s [d] float32, info)`` with ``info = {"alpha", "loss", "losses"}``; ``losses[0]`` is
    the alpha = 0 (RTN) loss, and ``loss == min(losses)``.
    """
    x = x.float()
    ws = [w.float() for w in weights]
    losses, best = [], (float("inf"), None, None)
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.float().pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        deltas = [quant.fake_quant(w * s, bits, sym, group_size, grid=GRID) / s - w for w in ws]
        loss = _out_error(ws, deltas, x, token_weight)
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], {"alpha": best[1], "loss": best[0], "losses": losses}


def _group_errors(w: torch.Tensor, q: torch.Tensor, xg: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
    """Per ``[out, group]``: ``sum_t tw_t (sum_{j in group} (q - w)_j x_tj)^2`` with grouped
    ``w``/``q`` ``[out, G, gs]`` and ``xg`` ``[T, G, gs]``."""
    d = (q - w).transpose(0, 1)  # [G, out, gs]
    out = torch.bmm(d, xg.permute(1, 2, 0))  # [G, out, T]
    return (out.pow(2) @ tw).T  # [out, G]


def _clamped_quant(wg: torch.Tensor, bits: int, sym: bool, ratio) -> torch.Tensor:
    """Grouped ``wg`` ``[..., gs]`` clamped to ``±ratio max|wg|`` per group (the reference's
    ``apply_clip``), then fake-quantized per group."""
    m = wg.abs().amax(-1, keepdim=True) * ratio
    return quant.fake_quant(wg.clamp(-m, m), bits, sym, None, grid=GRID)


@no_grad
def search_clip(W: torch.Tensor, x: torch.Tensor, bits: int, sym: bool, group_size: int | None,
                n_grid: int = 20, max_shrink: float = 0.5, token_weight: torch.Tensor | None = None,
                max_tokens: int = 512, oc_batch: int = 256):
    """Per-group clip ratios for ``W`` ``[out, d]`` reading ``x`` ``[T, d]`` (``max_tokens`` of them,
    evenly strided). Returns ``(ratios [out, n_groups, 1] for quantize_clipped, info)`` with
    ``info = {"loss": chosen summed per-group error, "loss_noclip": the same at ratio 1}``."""
    stride = max(1, math.ceil(len(x) / max_tokens))
    x = x[::stride].float()
    tw = torch.ones(len(x), device=x.device) if token_weight is None else token_weight[::stride].float()
    tw = tw / tw.sum().clamp(min=1e-12)
    xg = quant.group(x, group_size)
    wg_all = quant.group(W, group_size)
    ratios_grid = [1 - i / n_grid for i in range(int(max_shrink * n_grid))]
    best_r, best_e, noclip = [], [], []
    for o in range(0, W.shape[0], oc_batch):
        wg = wg_all[o:o + oc_batch]
        err_best = torch.full(wg.shape[:2], float("inf"), device=W.device)
        r_best = torch.ones(wg.shape[:2], device=W.device)
        for r in ratios_grid:
            err = _group_errors(wg, _clamped_quant(wg, bits, sym, r), xg, tw)
            if r == 1.0:
                noclip.append(err.sum())
            better = err < err_best
            err_best = torch.where(better, err, err_best)
            r_best = torch.where(better, r, r_best)
        best_r.append(r_best)
        best_e.append(err_best.sum())
    ratios = torch.cat(best_r).unsqueeze(-1)
    return ratios, {"loss": sum(best_e).item(), "loss_noclip": sum(noclip).item()}


def quantize_clipped(W: torch.Tensor, bits: int, sym: bool, group_size: int | None,
                     ratios: torch.Tensor | None = None) -> torch.Tensor:
    """AWQ's fake quantization of ``W``, clamped by per-group clip ratios ``[out, n_groups, 1]``
    (from ``search_clip``) when given."""
    if ratios is None:
        return quant.fake_quant(W, bits, sym, group_size, grid=GRID)
    return quant.ungroup(_clamped_quant(quant.group(W, group_size), bits, sym, ratios), W.shape[-1]).to(W.dtype)


@no_grad
def scale_block(block, stats: dict, spec, selected, n_grid: int = 20) -> dict:
    """Search and fold the AWQ scales of every subset of ``block`` (``selected(name)``: linears that
    get quantized); scales the collected tokens by 1/s. Returns ``{feeder: alpha}``."""
    found = []
    for names, feeder in zip(quant.SUBSETS, quant.FEEDERS):
        lins = [getattr(block, n) for n in names]
        fd = getattr(block, feeder)
        if not any(selected(n) for n in names) or fd.weight.shape[0] != lins[0].in_features:
            continue  # nothing to quantize, or GQA (v_proj rows != o_proj columns)
        st = stats[names[0]]
        s, info = search_scale([lin.weight for n, lin in zip(names, lins) if selected(n)], st.x, st.x_mean,
                               spec.w_bits, spec.w_sym, spec.group_size, n_grid, st.w)
        found.append((fd, lins, s, st, feeder, info["alpha"]))
    for fd, lins, s, st, _, _ in found:  # all searched on the FP block, as the reference
        quant.fold_scales(fd, lins, s)
        st.xs, st.ws = [st.x / s], [st.w]
    return {feeder: alpha for *_, feeder, alpha in found}


@register("awq", AWQOptions, calibration=True)
def quantize_weights(state, opts: AWQOptions) -> dict:
    spec = state.spec
    selected = set(quant.targets(state.model, spec))
    total = state.calib.input_ids.numel()
    done, alphas = [], []

    def fn(i, block, stats):
        sel = lambda n: f"blocks.{i}.{n}" in selected  # noqa: E731
        alphas.extend(scale_block(block, stats, spec, sel, opts.n_grid).values())
        for name, st in stats.items():
            if not sel(name):
                continue
            layer = getattr(block, name)
            ratios = None
            if opts.clip and name not in NO_CLIP:
                ratios, _ = search_clip(layer.weight, st.x, spec.w_bits, spec.w_sym, spec.group_size,
                                        token_weight=st.w)
            layer.weight.copy_(quantize_clipped(layer.weight, spec.w_bits, spec.w_sym, spec.group_size, ratios))
            done.append(f"blocks.{i}.{name}")

    quant.walk_blocks(state.model, state.calib, fn,
                      lambda layer: quant.TokenStats(layer.in_features, total, opts.max_tokens, layer.weight.device),
                      batch_size=opts.batch_size, true_sequential=False,
                      token_weights=getattr(state.calib, "token_weights", None))
    return {"layers": len(done), "mean_alpha": sum(alphas) / len(alphas) if alphas else None}
