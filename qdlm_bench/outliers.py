"""Activation outliers at the input of every linear, split by masked / unmasked tokens and mask ratio.

    python -m qdlm_bench.outliers model=tiny_llada_instruct calib=tiny calib.n_samples=8 \\
        [method=quarot bits=w4a4] [ratios=[0,0.25,0.5,0.75,1]] [layers=[blocks.1.down_proj]] \\
        [surface_ratio=0.5] [outlier_factor=10] [batch_size=4] [out=reports/outliers/NAME]

The calibration windows of the ``calib`` group (unmasked) are masked at each ratio r with the
model's mask token (round(r * L) random positions per window) and run through the model. A hook
on every linear of every block reads its input as the activation quantizer sees it (after any
online transform a method installed) and accumulates, per token group (masked / unmasked):
max |x|, the per-channel max |x| (top channels), the kurtosis of all values (3 for a Gaussian)
and the share of tokens holding an outlier: a channel with |x| > outlier_factor x the token's
median |x| (the median ignores the outliers themselves; a Gaussian token of 12k channels stays below 7x).

With method=... (and bits=...), the statistics after that method (built as run.py builds a run)
are compared with the FP model's; without method=, the FP model alone.

Writes to ``out`` (default reports/outliers/<model>[-<method>-<bits>]): stats.json, summary.md,
layer_max.{png,pdf} (per-layer max |x| for each linear type), mask_ratio-<label>.{png,pdf}
(max |x| and outlier share against the mask ratio, masked vs unmasked tokens) and
surface-<label>-<layer>.{png,pdf} (3-D token x channel |x| of the first window at surface_ratio;
layers: ``layers``, else the FP model's layers of largest max |x| and largest kurtosis).
wandb.mode=offline|online logs them (job type "outliers").
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from qdlm_bench import analysis, plots
from qdlm_bench.calibration import apply_masking
from qdlm_bench.models.config import LINEAR_NAMES
from qdlm_bench.quant import QuantLinear, linear_layers
from qdlm_bench.report import slug

GROUPS = ("masked", "unmasked")
OPTIONS = {"ratios": [0.0, 0.25, 0.5, 0.75, 1.0], "layers": None, "surface_ratio": 0.5, "outlier_factor": 10.0,
           "top_k": 8, "batch_size": 4, "out": None}
Stats = dict[float, dict[str, dict[str, "InputStats"]]]  # ratio -> layer -> group -> stats


class InputStats:
    """Streaming statistics of one linear's inputs over a set of tokens (rows of [N, dim])."""

    def __init__(self, dim: int, outlier_factor: float = OPTIONS["outlier_factor"]):
        self.outlier_factor = outlier_factor
        self.tokens = 0
        self.outlier_tokens = 0
        self.moments = torch.zeros(4, dtype=torch.float64)  # sums of x, x^2, x^3, x^4 over all values
        self.channel_max = torch.zeros(dim, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        if not len(x):
            return
        x = x.detach().float()
        a = x.abs()
        self.tokens += len(x)
        self.moments += torch.stack([x.pow(k).sum(dtype=torch.float64) for k in range(1, 5)]).cpu()
        self.channel_max = torch.maximum(self.channel_max, a.amax(0).double().cpu())
        self.outlier_tokens += int((a.amax(-1) > self.outlier_factor * a.median(-1).values).sum())

    def merge(self, other: InputStats) -> InputStats:
        out = InputStats(len(self.channel_max), self.outlier_factor)
        out.tokens, out.outlier_tokens = self.tokens + other.tokens, self.outlier_tokens + other.outlier_tokens
        out.moments = self.moments + other.moments
        out.channel_max = torch.maximum(self.channel_max, other.channel_max)
        return out

    @property
    def max_abs(self) -> float:
        return float(self.channel_max.max()) if self.tokens else math.nan

    @property
    def kurtosis(self) -> float:
        """Pearson kurtosis E[(x - mean)^4] / var^2 of all input values (3 for a Gaussian)."""
        if not self.tokens:
            return math.nan
        m1, m2, m3, m4 = (self.moments / (self.tokens * len(self.channel_max))).tolist()
        var = m2 - m1 ** 2
        central4 = m4 - 4 * m1 * m3 + 6 * m1 ** 2 * m2 - 3 * m1 ** 4
        return central4 / var ** 2 if var > 0 else math.nan

    @property
    def outlier_share(self) -> float:
        return self.outlier_tokens / self.tokens if self.tokens else math.nan

    def top_channels(self, k: int) -> list[int]:
        return self.channel_max.topk(min(k, len(self.channel_max))).indices.tolist() if self.tokens else []

    def summary(self, k: int) -> dict:
        def num(v): return None if math.isnan(v) else round(v, 6)
        return {"tokens": self.tokens, "max_abs": num(self.max_abs), "kurtosis": num(self.kurtosis),
                "outlier_share": num(self.outlier_share),
                "top_channels": [[c, num(float(self.channel_max[c]))] for c in self.top_channels(k)]}


def _hook_target(layer: nn.Module) -> nn.Module:
    """The module whose input is what gets quantized: a QuantLinear's activation quantizer."""
    return layer.act_quant if isinstance(layer, QuantLinear) else layer


@contextmanager
def _input_hooks(model: nn.Module, names: Iterable[str], fn: Callable[[str, torch.Tensor], None]):
    """Call ``fn(name, input)`` on every forward of the named linears; hooks removed on exit."""
    layers = linear_layers(model)
    hooks = [_hook_target(layers[n]).register_forward_pre_hook(lambda m, args, n=n: fn(n, args[0])) for n in names]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def masked_windows(ids: torch.Tensor, ratio: float, mask_token_id: int, seed: int = 0):
    """(ids with round(ratio * L) random positions per row masked, the masked flags)."""
    gen = torch.Generator().manual_seed(seed)
    return apply_masking(ids, torch.full((len(ids),), float(ratio)), mask_token_id, gen)


@torch.no_grad()
def collect(model: nn.Module, ids: torch.Tensor, ratios: Iterable[float], *,
            outlier_factor: float = OPTIONS["outlier_factor"], batch_size: int = 4, seed: int = 0) -> Stats:
    """Input statistics of every linear of ``model`` over ``ids`` [N, L] masked at each ratio."""
    ratios = [float(r) for r in ratios]
    if not ratios or not all(0 <= r <= 1 for r in ratios):
        raise ValueError(f"mask ratios must be a non-empty list of numbers in [0, 1], got {ratios}")
    layers = linear_layers(model)
    stats: Stats = {}
    current = {}

    def record(name: str, x: torch.Tensor) -> None:
        for group, sel in zip(GROUPS, (current["masked"], ~current["masked"])):
            current["stats"][name][group].add(x[sel])

    with _input_hooks(model, layers, record):
        for ratio in ratios:
            masked_ids, masked = masked_windows(ids, ratio, model.config.mask_token_id, seed)
            stats[ratio] = current["stats"] = {
                n: {g: InputStats(layer.in_features, outlier_factor) for g in GROUPS} for n, layer in layers.items()}
            for i in range(0, len(ids), batch_size):
                current["masked"] = masked[i:i + batch_size].to(model.device)
                model.hidden_states(masked_ids[i:i + batch_size].to(model.device))
    return stats


def pooled(stats: Stats, ratios: Iterable[float] | None = None, groups: Iterable[str] = GROUPS) -> dict[str, InputStats]:
    """Per layer, the statistics merged over ``ratios`` (all by default) and ``groups``."""
    merged = {}
    for ratio in stats if ratios is None else ratios:
        for name, by_group in stats[ratio].items():
            for group in groups:
                merged[name] = merged[name].merge(by_group[group]) if name in merged else by_group[group]
    return merged


@torch.no_grad()
def capture(model: nn.Module, ids: torch.Tensor, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """|input| [L, d] of the named linears for one sequence ``ids`` [L]."""
    found = {}
    with _input_hooks(model, names, lambda n, x: found.__setitem__(n, x[0].detach().abs().float().cpu())):
        model.hidden_states(ids[None].to(model.device))
    return found


def summary(stats: Stats, k: int) -> dict:
    """JSON-ready: per layer, the statistics of all tokens and per ratio and token group."""
    everything = pooled(stats)
    return {name: {"all": everything[name].summary(k),
                   "by_ratio": {str(r): {g: stats[r][name][g].summary(k) for g in GROUPS} for r in stats}}
            for name in everything}


def summary_table(stats: Stats, k: int) -> pd.DataFrame:
    """One row per layer: max |x|, top channels, kurtosis and outlier share, overall and per token group."""
    parts = {"all": pooled(stats), **{g: pooled(stats, groups=[g]) for g in GROUPS}}
    rows = []
    for name, s in parts["all"].items():
        row = {"layer": name, "max |x|": s.max_abs, "top channels": ", ".join(map(str, s.top_channels(k))),
               "kurtosis": s.kurtosis, "outlier share": s.outlier_share}
        for g in GROUPS:
            row[f"max |x| {g}"], row[f"outlier share {g}"] = parts[g][name].max_abs, parts[g][name].outlier_share
        rows.append(row)
    return pd.DataFrame(rows)


def _block_and_type(name: str) -> tuple[int, str]:
    _, block, kind = name.split(".")
    return int(block), kind


def by_type(per_layer: dict[str, InputStats]) -> dict[str, InputStats]:
    """Statistics merged over the blocks, per linear type."""
    merged = {}
    for name, s in per_layer.items():
        kind = _block_and_type(name)[1]
        merged[kind] = merged[kind].merge(s) if kind in merged else s
    return merged


def _merge_equal(items: dict[str, object]) -> dict[str, object]:
    """Items of equal value under one key, their keys joined by " = " (linears sharing an input)."""
    groups: dict[str, list[str]] = {}
    for key, value in items.items():
        groups.setdefault(repr(value), []).append(key)
    return {" = ".join(keys): items[keys[0]] for keys in groups.values()}


def plot_layer_max(results: dict[str, Stats], stem: Path) -> list[Path]:
    """Per-layer max |x| for each linear type, one line per analysed model."""
    panels = {kind: {} for kind in LINEAR_NAMES}
    for label, stats in results.items():
        for name, s in pooled(stats).items():
            block, kind = _block_and_type(name)
            xs, ys = panels[kind].setdefault(label, ([], []))
            xs.append(block)
            ys.append(s.max_abs)
    panels = _merge_equal({kind: lines for kind, lines in panels.items() if lines})
    return plots.line_panels(panels, stem, title="max |x| of linear inputs per block", xlabel="block",
                             log_y=True, ncols=min(4, len(panels)))


def plot_mask_ratio(stats: Stats, stem: Path, label: str) -> list[Path]:
    """Max |x| and outlier-token share against the mask ratio per linear type, masked vs unmasked."""
    ratios = list(stats)
    merged = {r: {g: by_type(pooled(stats, [r], [g])) for g in GROUPS} for r in ratios}
    metrics = {"max |x|": "max_abs", "share of tokens with an outlier": "outlier_share"}
    series = _merge_equal({kind: {m: {g: [getattr(merged[r][g][kind], attr) for r in ratios] for g in GROUPS}
                                  for m, attr in metrics.items()}
                           for kind in merged[ratios[0]][GROUPS[0]]})
    panels = {m: {f"{kind} {g}": (ratios, ys[m][g]) for kind, ys in series.items() for g in GROUPS} for m in metrics}
    colors = {kind: f"C{i}" for i, kind in enumerate(series)}

    def style(line: str) -> dict:
        kind, group = line.rsplit(" ", 1)
        return {"color": colors[kind], "linestyle": "-" if group == "masked" else "--"}

    return plots.line_panels(panels, stem, title=f"{label}: outliers vs mask ratio (solid masked, dashed unmasked)",
                             xlabel="mask ratio", style=style)


def default_layers(per_layer: dict[str, InputStats]) -> list[str]:
    """The layers of largest max |x| and of largest kurtosis."""
    def top(attr: str) -> str:
        values = {name: getattr(s, attr) for name, s in per_layer.items()}
        return max(values, key=lambda name: -math.inf if math.isnan(values[name]) else values[name])

    return list(dict.fromkeys(top(attr) for attr in ("max_abs", "kurtosis")))


def write_outputs(results: dict[str, Stats], surfaces: dict[str, dict[str, torch.Tensor]], out: Path,
                  opt: dict, title: str) -> list[Path]:
    """stats.json, summary.md and every figure into ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(json.dumps(
        {"ratios": list(next(iter(results.values()))), "outlier_factor": opt["outlier_factor"],
         "models": {label: summary(stats, opt["top_k"]) for label, stats in results.items()}}, indent=1))
    text = [f"# Activation outliers: {title}", "", f"mask ratios {opt['ratios']}; outlier: |x| > "
            f"{opt['outlier_factor']} x the token's median |x|; kurtosis 3 = Gaussian", ""]
    for label, stats in results.items():
        text += [f"## {label}", "", summary_table(stats, opt["top_k"]).to_markdown(index=False, floatfmt=".3g"), ""]
    (out / "summary.md").write_text("\n".join(text))
    files = [out / "stats.json", out / "summary.md", *plot_layer_max(results, out / "layer_max")]
    for label, stats in results.items():
        files += plot_mask_ratio(stats, out / f"mask_ratio-{slug(label)}", label)
        for name, magnitude in surfaces[label].items():
            files += plots.surface(magnitude, out / f"surface-{slug(label)}-{name}",
                                   title=f"{label} {name} input |x| (mask ratio {opt['surface_ratio']})")
    return files


def main(argv: list[str] | None = None) -> int:
    cfg, opt, with_method = analysis.parse_args(sys.argv[1:] if argv is None else argv, OPTIONS)
    spec = analysis.build_spec(cfg)
    fp, tokenizer = analysis.load(spec)
    known = list(linear_layers(fp))
    if unknown := [n for n in opt["layers"] or () if n not in known]:
        raise SystemExit(f"layers: unknown linear(s) {unknown}; names look like {known[0]}")
    ids = analysis.token_windows(cfg, spec, tokenizer, fp.config.mask_token_id)
    sample = masked_windows(ids[:1], opt["surface_ratio"], fp.config.mask_token_id, spec.seed)[0][0]
    models: dict[str, Callable[[], nn.Module]] = {"fp": lambda: fp}
    if with_method and spec.method["name"] != "fp":
        models[analysis.label(spec)] = lambda: analysis.quantized(spec, cfg)
    results, surfaces, layers = {}, {}, opt["layers"]
    for label, make in models.items():
        model = make()
        results[label] = collect(model, ids, opt["ratios"], outlier_factor=opt["outlier_factor"],
                                 batch_size=opt["batch_size"], seed=spec.seed)
        layers = layers or default_layers(pooled(results[label]))
        surfaces[label] = capture(model, sample, layers)
    out = Path(opt["out"] or analysis.default_out("outliers", "-".join([spec.model["name"], *list(models)[1:]])))
    files = write_outputs(results, surfaces, out, opt, f"{spec.model['name']}, {len(ids)} windows of {ids.shape[1]}")
    print((out / "summary.md").read_text())
    print(f"wrote {len(files)} files to {out}", file=sys.stderr)
    analysis.logger(cfg).log_outputs(f"outliers-{out.name}", "outliers", config=cfg, files=files,
                                     images=[p for p in files if p.suffix == ".png"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
