"""DuQuant (Lin et al., 2024): smoothing, then rotation + zigzag permutation + rotation of each input.

Per block, on the FP block's inputs (the outputs of the already-quantized previous blocks), for
each subset whose input is quantized (``a < 16`` and named in ``quant.act_layers``):

1. smoothing ``s = max|x|^alpha / max|W|^(1-alpha)`` folded into the preceding norm / linear
   (``quant/smooth.py``; skipped for v_proj -> o_proj under GQA, where v_proj cannot absorb it);
2. ``M = R1 P R2`` fitted on the smoothed calibration tokens (``quant/duquant.py``), folded into
   the weights (``W -> W M``, ``M`` orthogonal) and run online as the ``QuantLinear`` input
   transform (two block-diagonal matmuls and a gather). No preceding op can absorb ``M``: a
   norm's weight is a per-channel scale, SwiGLU's product (down_proj's input) is elementwise, and
   attention mixes V within heads while ``P`` crosses heads (o_proj's input);
3. weights round-to-nearest with clip ratio ``swc`` (null = none); activations per-token with clip
   ratio ``lac`` (null = ``quant.act_clip_ratio``; otherwise setting both is an error).

cfg keys: ``alpha`` (0.6), ``block_size`` (128, capped at each input's dim), ``steps`` (256 greedy
steps per rotation), ``lac`` (0.9), ``swc`` (0.8), ``max_tokens`` (512 sampled tokens per subset,
plus ``n_peak`` (32) largest tokens), ``seed`` (0), ``batch_size`` (8), ``exclude``.
"""

import dataclasses

import torch

from qdlm_bench.quant import QuantLinear, QuantSpec, fake_quant, wrap_activations
from qdlm_bench.quant.duquant import OutlierStats, fit_transform
from qdlm_bench.quant.smooth import act_selection, smooth_block
from qdlm_bench.quant.walk import SUBSETS, walk_blocks

from . import register


@torch.no_grad()
def transform_block(block, stats: dict, alpha: float, selected, wanted, block_size: int = 128,
                    steps: int = 256, generator: torch.Generator | None = None) -> dict:
    """Smooth and rotate every subset of ``block`` holding a ``wanted(name)`` linear: its
    ``selected(name)`` linears get the transform folded into their weights and installed as
    their online input transform (``QuantLinear`` with nothing quantized yet). The FP function
    is unchanged. Returns ``{name: DuQuantTransform}``."""
    scales = smooth_block(block, {n: st.max for n, st in stats.items()}, alpha, wanted)
    found = {}
    for names in SUBSETS:
        if not any(wanted(n) for n in names):
            continue
        x = stats[names[0]].x
        T = fit_transform(x / scales[names[0]] if names[0] in scales else x, block_size, steps, generator)
        for name in filter(selected, names):
            layer = getattr(block, name)
            layer.weight.copy_(T(layer.weight))
            setattr(block, name, QuantLinear(layer, QuantSpec(), T))
            found[name] = T
    return found


@register("duquant", needs_calibration=True)
def quantize(model, spec: QuantSpec, calib, cfg: dict) -> dict:
    exclude = cfg.get("exclude") or ()
    selected, wanted = act_selection(model, spec, exclude, "duquant")
    lac, swc = cfg.get("lac", 0.9), cfg.get("swc", 0.8)
    for key, ratio in (("lac", lac), ("swc", swc)):
        if ratio is not None and not 0 < ratio <= 1:
            raise ValueError(f"duquant's clip ratio method.{key} must be in (0, 1] or null, got {ratio}")
    if spec.a_clip_ratio != 1.0 and lac is not None:
        raise ValueError(f"duquant sets the activation clip ratio with method.lac ({lac}); quant.act_clip_ratio="
                         f"{spec.a_clip_ratio} conflicts: leave it at 1.0 or set method.lac=null")
    act_spec = spec if lac is None else dataclasses.replace(spec, a_clip_ratio=lac)
    opts = dict(alpha=float(cfg.get("alpha", 0.6)), block_size=cfg.get("block_size", 128),
                steps=cfg.get("steps", 256))
    gen = torch.Generator().manual_seed(cfg.get("seed", 0))
    total = calib.input_ids.numel()
    done, transformed = [], []

    def fn(i, block, stats):
        transforms = transform_block(block, stats, selected=lambda n: selected(i, n),
                                     wanted=lambda n: wanted(i, n), generator=gen, **opts)
        transformed.extend(f"blocks.{i}.{n}" for n in transforms)
        for name in stats:
            if selected(i, name):
                layer = getattr(block, name)
                layer.weight.copy_(fake_quant(layer.weight, spec.w_bits, spec.w_sym, spec.group_size, swc or 1.0))
                done.append(f"blocks.{i}.{name}")

    walk_blocks(model, calib, fn,
                lambda layer: OutlierStats(layer.in_features, total, cfg.get("max_tokens", 512), cfg.get("n_peak", 32),
                                           layer.weight.device),
                batch_size=cfg.get("batch_size", 8), true_sequential=False)
    wrap_activations(model, act_spec, exclude=exclude)
    return {"layers": len(done), "transformed": len(transformed)}
