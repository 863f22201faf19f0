"""AWQ (Lin et al., 2024): activation-aware scales folded into the preceding op, then clip search.

Per block, on the FP block's inputs (the outputs of the already-quantized previous blocks):
for each subset (attn_norm->q/k/v, v_proj->o_proj when shapes allow (no GQA), mlp_norm->gate/up,
up_proj->down_proj) search ``s = mean|x|^alpha`` (``quant/awq.py``) on the FP weights, fold all
scales, search per-group clip ratios on the scaled inputs (q/k skipped, as the reference), then
fake-quantize every selected linear. Activations are wrapped (per-token dynamic) when a < 16.

cfg keys: ``n_grid`` (20), ``clip`` (True), ``max_tokens`` (4096), ``batch_size`` (8),
``exclude`` (fnmatch patterns of layer names).
"""


from qdlm_bench.quant import QuantSpec, linear_layers, wrap_activations
from qdlm_bench.quant.awq import TokenStats, fold_scales, quantize_clipped, search_clip, search_scale
from qdlm_bench.quant.walk import FEEDERS, SUBSETS, walk_blocks

from . import register

NO_CLIP = ("q_proj", "k_proj")


def scale_block(block, stats: dict, spec: QuantSpec, selected, n_grid: int = 20) -> dict:
    """Search and fold the AWQ scales of every subset of ``block`` (``selected(name)``: linears that
    get quantized); scales the collected tokens by 1/s. Returns ``{feeder: alpha}``."""
    found = []
    for names, feeder in zip(SUBSETS, FEEDERS):
        lins = [getattr(block, n) for n in names]
        fd = getattr(block, feeder)
        if not any(selected(n) for n in names) or fd.weight.shape[0] != lins[0].in_features:
            continue  # nothing to quantize, or GQA (v_proj rows != o_proj columns)
        st = stats[names[0]]
        s, info = search_scale([lin.weight for n, lin in zip(names, lins) if selected(n)], st.x, st.x_mean,
                               spec.w_bits, spec.w_sym, spec.group_size, n_grid, st.w)
        found.append((fd, lins, s, st, feeder, info["alpha"]))
    for fd, lins, s, st, _, _ in found:  # all searched on the FP block, as the reference
        fold_scales(fd, lins, s)
        st.xs, st.ws = [st.x / s], [st.w]
    return {feeder: alpha for *_, feeder, alpha in found}


@register("awq", needs_calibration=True)
def quantize(model, spec: QuantSpec, calib, cfg: dict) -> dict:
    exclude = cfg.get("exclude") or ()
    selected = set(linear_layers(model, exclude))
    n_grid, clip = cfg.get("n_grid", 20), cfg.get("clip", True)
    total = calib.input_ids.numel()
    done, alphas = [], []

    def fn(i, block, stats):
        sel = lambda n: f"blocks.{i}.{n}" in selected  # noqa: E731
        alphas.extend(scale_block(block, stats, spec, sel, n_grid).values())
        for name, st in stats.items():
            if not sel(name):
                continue
            layer = getattr(block, name)
            ratios = None
            if clip and name not in NO_CLIP:
                ratios, _ = search_clip(layer.weight, st.x, spec.w_bits, spec.w_sym, spec.group_size,
                                        token_weight=st.w)
            layer.weight.copy_(quantize_clipped(layer.weight, spec.w_bits, spec.w_sym, spec.group_size, ratios))
            done.append(f"blocks.{i}.{name}")

    walk_blocks(model, calib, fn,
                lambda layer: TokenStats(layer.in_features, total, cfg.get("max_tokens", 4096), layer.weight.device),
                batch_size=cfg.get("batch_size", 8), true_sequential=False,
                token_weights=getattr(calib, "token_weights", None))
    wrap_activations(model, spec, exclude=exclude)
    return {"layers": len(done), "mean_alpha": sum(alphas) / len(alphas) if alphas else None}
