"""Per-layer output error of GPTQ and RTN weights, on the inputs GPTQ was fitted to and on others.

    python -m qdlm_bench.layer_error model=tiny_llada_instruct bits=w2a16g64 calib=tiny \
        [heldout=prompts:mini_math+mini_code] [out=reports/layer_error/...]

Every linear of every block sees the FP model's inputs of two sets: the run's calibration set
(``calib``, what GPTQ fits) and a held-out set (``heldout``: any calibration source, same
n_samples and seqlen). Each weight is quantized alone, by RTN and by GPTQ (on GPTQ's grid, as the
methods) with the Hessian of its fit inputs (FP inputs, no error carried between layers, so layers
compare one to one), and its relative output error ``||X (Q - W)^T|| / ||X W^T||`` is measured on both sets. It needs
only each input's Gram matrix, so memory is one ``d x d`` matrix per linear and set.
Shows whether GPTQ's gain carries over from its calibration text to other inputs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from qdlm_bench import analysis, calibration
from qdlm_bench.quant import fake_quant, linear_layers
from qdlm_bench.methods.gptq import GPTQOptions, Hessian, gptq_quantize
from qdlm_bench.models.transformer import unpacked

OPTIONS = {"heldout": "prompts:mini_math+mini_code", "out": None}


@torch.no_grad()
def gram_matrices(model, calib: calibration.CalibSet, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{linear name: Gram matrix (proportional to X^T X)}`` of every block linear's FP input over
    ``calib``, padding excluded."""
    layers = linear_layers(model)
    grams = {name: Hessian(layer.in_features, layer.weight.device) for name, layer in layers.items()}
    weights: dict = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, g=grams[name]: g.add(a[0], weights["w"]))
             for name, layer in layers.items()]
    try:
        with unpacked(model):  # the hooks weight [B, L] inputs by the attention mask
            for batch in calib.batches(batch_size):
                am = batch.attention_mask
                weights["w"] = None if am is None else am.to(model.device)
                model(batch.input_ids.to(model.device), None if am is None else am.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return {name: g.H for name, g in grams.items()}


def relative_error(W: torch.Tensor, Q: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X (Q - W)^T|| / ||X W^T||`` from the Gram matrix ``X^T X`` alone."""
    D, W = (Q - W).float(), W.float()
    return float(torch.sqrt(((D @ gram) * D).sum() / ((W @ gram) * W).sum()))


def layer_errors(model, spec, fit: dict, held: dict, opts=None) -> list[dict]:
    """Per linear: RTN's and GPTQ's relative output error on the fit and held-out inputs (GPTQ with
    ``opts``, its validated options; defaults when None)."""
    opts = opts or GPTQOptions()
    solver = dict(block_size=opts.block_size, damp=opts.damp, act_order=opts.act_order, static_groups=opts.static_groups)
    rows = []
    for name, layer in linear_layers(model).items():
        W = layer.weight.data
        rtn = fake_quant(W, spec.w_bits, spec.w_sym, spec.group_size, grid="gptq")  # as methods/rtn.py
        gptq, _ = gptq_quantize(W, fit[name], spec.w_bits, spec.w_sym, spec.group_size, name=name, **solver)
        rows.append({"layer": name, **{f"{q}_{s}": relative_error(W, Q, g) for q, Q in (("rtn", rtn), ("gptq", gptq))
                                       for s, g in (("fit", fit[name]), ("heldout", held[name]))}})
    return rows


def main(argv: list[str] | None = None) -> int:
    cfg, opt, _ = analysis.parse_args(sys.argv[1:] if argv is None else argv, OPTIONS)
    method = cfg["method"] if cfg["method"]["name"] == "gptq" else {"name": "gptq"}  # GPTQ's options, as a run
    spec = analysis.build_spec({**cfg, "method": method})
    model, tokenizer = analysis.load(spec)
    mask_id = model.config.mask_token_id
    fit_cfg = spec.calib
    held_cfg = dataclasses.replace(fit_cfg, source=opt["heldout"])
    sets = {k: calibration.build(c, tokenizer, mask_id, data_dir=spec.settings.data_dir)
            for k, c in (("fit", fit_cfg), ("heldout", held_cfg))}
    grams = {k: gram_matrices(model.eval(), s) for k, s in sets.items()}
    rows = layer_errors(model, spec.quant, grams["fit"], grams["heldout"], spec.options)
    cols = ["rtn_fit", "gptq_fit", "rtn_heldout", "gptq_heldout"]
    mean = {c: sum(r[c] for r in rows) / len(rows) for c in cols}
    out = Path(opt["out"] or analysis.default_out("layer_error", f"{spec.model['name']}-{spec.quant.name}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_error.json").write_text(json.dumps(
        {"model": spec.model["name"], "bits": spec.quant.name, "fit": fit_cfg.source, "heldout": held_cfg.source,
         "mean": mean, "layers": rows}, indent=1))
    print(f"{spec.model['name']} {spec.quant.name}: mean relative output error over {len(rows)} linears\n"
          f"  fitted on {fit_cfg.source}: rtn {mean['rtn_fit']:.3f}, gptq {mean['gptq_fit']:.3f}\n"
          f"  held out ({held_cfg.source}): rtn {mean['rtn_heldout']:.3f}, gptq {mean['gptq_heldout']:.3f}\n"
          f"wrote {out / 'layer_error.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
