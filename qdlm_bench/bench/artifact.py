"""The artifact benchmark: what saving a quantized model costs and saves.

    python -m qdlm_bench.bench artifact [run.py overrides: model=... method=... bits=... device=...
        calib.n_samples=...] [dir=<folder>] [keep=false] [probe_len=64] [layout_shape=llada-8b]
        [out=bench.json]

Builds the run's spec as ``run.py`` does, loads the FP model and quantizes it (calibration,
method, fault check: ``pipeline.quantize``), saves its artifact in ``dir`` (default: a fresh
folder under ``results/``, removed afterwards unless ``keep=true``), loads it back and checks the
loaded model against the one in memory: every state tensor bit-equal and float32 logits equal on
a probe batch (2 x ``probe_len`` random tokens). Then ``pipeline.quantized_model`` is timed as a
later run meets it (artifact found, loaded; no calibration or quantization).

Reports the artifact's bytes against the FP model's in its dtype and in bfloat16, the tensor bytes
against ``artifacts.layout.planned_bytes`` (the size computed from the layout, which must match),
and that computation for the shape preset ``layout_shape`` at the same bits in bfloat16 (LLaDA-8B's
by default: its size computed, not measured). Times: FP load, calibration, quantization, check,
save (recovering the integer codes, packing, writing), load, and a later run's whole model setup.

    python -m qdlm_bench.bench artifact model=llada_8b_random method=gptq bits=w4a16g128 device=cuda
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from qdlm_bench import analysis, pipeline
from qdlm_bench.artifacts import ArtifactStore, layout
from qdlm_bench.artifacts.codes import bit_equal
from qdlm_bench.models.factory import load_fp_model
from qdlm_bench.models.presets import SHAPES

from .common import device_peak, sync

OPTIONS = {"dir": None, "keep": False, "probe_len": 64, "layout_shape": "llada-8b", "out": None}


def _timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, round(time.perf_counter() - start, 3)


def computed(shape: str, quant, dtype: str = "bfloat16") -> dict:
    """The planned artifact size of shape preset ``shape`` at ``quant`` (no weights: from the layout)."""
    fmt = layout.CT_FORMAT if quant.weight_only else layout.OWN_FORMAT
    planned = layout.planned_bytes(SHAPES[shape], quant, dtype, fmt)
    return {"shape": shape, "bits": quant.name, "dtype": dtype, "format": fmt, "computed_from_layout": True,
            "tensor_bytes": planned["tensors"], "fp_bytes": planned["fp"], "parts": planned,
            "gb": round(planned["tensors"] / 1e9, 3), "fp_gb": round(planned["fp"] / 1e9, 3),
            "ratio": round(planned["tensors"] / planned["fp"], 4)}


@torch.no_grad()
def run(argv: list[str]) -> dict:
    cfg, opt, _ = analysis.parse_args([a for a in argv if not a.startswith("out=")], OPTIONS)
    spec = analysis.build_spec(cfg)
    if spec.method["name"] == "fp":
        raise SystemExit("method=fp has no artifact: name a quantization method (method=gptq ...)")
    root = Path(opt["dir"]) if opt["dir"] else Path(tempfile.mkdtemp(prefix="bench-artifacts-", dir=_mkdir("results")))
    store = ArtifactStore(root)
    times: dict = {}
    try:
        (model, tokenizer), times["load_fp_s"] = _timed(lambda: load_fp_model(spec.model, spec.dtype, spec.device,
                                                                                spec.seed))
        info = pipeline.quantize(spec, model, tokenizer, times)
        with store.lock(spec.quantization_key()):
            manifest, times["save_s"] = _timed(lambda: store.save(spec, model, info, times.get("quantize_s")))
        (loaded, _, _), times["load_artifact_s"] = _timed(lambda: store.load(spec, manifest=manifest))
        cfgm = model.config
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, min(cfgm.vocab_size, cfgm.mask_token_id), (2, opt["probe_len"]), generator=g)
        ids = ids.to(model.device)
        a, b = model(ids).float(), loaded(ids).float()
        sa, sb = model.state_dict(), loaded.state_dict()
        exact = {"logits_equal": bool(torch.equal(a, b)),
                 "state_bit_equal": sa.keys() == sb.keys() and all(bit_equal(sa[k], sb[k]) for k in sa),
                 "modules_equal": str(model) == str(loaded)}
        del loaded, a, b, sa, sb
        later: dict = {}
        used: dict = {}
        _, times["later_run_model_s"] = _timed(lambda: pipeline.quantized_model(spec, later, root, used=used))
        folder = store.path_for(spec.quantization_key())
        planned = layout.planned_bytes(model.config, spec.quant, spec.dtype, manifest["format"])
        sizes = dict(manifest["sizes"])
        bf16 = planned["fp"] // torch.empty((), dtype=getattr(torch, spec.dtype)).element_size() * 2
        sizes.update(fp_bf16_bytes=bf16, planned_tensor_bytes=planned["tensors"],
                     planned_matches=planned["tensors"] == sizes["tensor_bytes"],
                     ratio_to_fp=round(sizes["artifact_bytes"] / sizes["fp_bytes"], 4),
                     ratio_to_bf16=round(sizes["artifact_bytes"] / bf16, 4))
        gpu, _ = device_peak()
        return {
            "bench": "artifact", "args": {**opt, "overrides": [a for a in argv if "=" in a and a.split("=")[0]
                                                             not in OPTIONS]},
            "device": gpu, "dtype": spec.dtype, "model": spec.model["name"], "method": spec.method["name"],
            "bits": spec.quant.name, "key": manifest["key"], "format": manifest["format"],
            "format_note": manifest["format_note"], "path": str(folder),
            "layers": {"packed": sizes["packed_layers"], "dense": sizes["dense_layers"]},
            "sizes": sizes, "times": times, "later_run": {"loaded": used["artifact"]["loaded"], "timings": later},
            "load_over_quantize": round(times["load_artifact_s"] / max(times.get("quantize_s", 0)
                                                                        + times.get("calibrate_s", 0), 1e-9), 4),
            "exact": exact, "computed_layout": computed(opt["layout_shape"], spec.quant),
        }
    finally:
        if not opt["keep"] and not opt["dir"]:
            shutil.rmtree(root, ignore_errors=True)


def _mkdir(path: str) -> str:
    Path(path).mkdir(parents=True, exist_ok=True)
    return path
