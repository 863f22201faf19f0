"""Real low-bit inference (issue 14): ``runtime=real`` executes a quantized model with low-bit
kernels (``qdlm_bench.runtime.real``) and computes what the fake-quantized model computes.

Tolerances (CPU, float32, the kernels' CPU paths):

* one layer, int8 W8A8 (``torch._int_mm``): within 1e-5 of the fake layer relative to its largest
  output (same integer codes, exact integer accumulation; the difference is float32 summation order);
* one layer, int4 W4A16 (tinygemm for CPU, in bf16: its float32 path is ~70x slower than sgemm):
  within 1e-2 of the fake layer (bf16 activations, scales, zeros and output), and so is the CUDA
  dense path's dequantized weight (``Int4Linear.dequantized``, the learnt packing order);
* a whole model: logits within 5e-2 relative (Frobenius) and the same argmax at >= 95% of
  positions. int8: each layer is exact, but a float32 difference of 1e-7 can move an activation
  across a rounding tie of the next layer's per-token quantizer (one code step), which later
  layers carry; int4: bf16 rounding, layer after layer.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_pipeline import config

from qdlm_bench import pipeline, runspec
from qdlm_bench.bench import runtime as bench_runtime
from qdlm_bench.evaluation import request_cache
from qdlm_bench.quant.linear import QuantLinear
from qdlm_bench.quant.quantizer import fake_quant
from qdlm_bench.quant.spec import QuantSpec
from qdlm_bench.runtime import real
from qdlm_bench.store import spec_key

CALIB = ["calib.n_samples=4", "calib.seqlen=32"]


def spec_of(*overrides: str) -> runspec.RunSpec:
    return runspec.build(config(*CALIB, *overrides))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ---------------------------------------------------------------------------------- layers


@pytest.mark.parametrize("a_sym,w_sym,grid", [(True, True, "absmax"), (False, True, "absmax"),
                                              (False, False, "absmax"), (True, True, "duquant"),
                                              (False, False, "duquant"), (False, True, "gptq")])
def test_int8_layer_equals_fake_layer(a_sym, w_sym, grid):
    lin = torch.nn.Linear(256, 96, bias=True)
    lin.weight.data = fake_quant(lin.weight.data, 8, w_sym, None, 1.0, "absmax")
    layer = QuantLinear(lin, QuantSpec.parse("w8a8", a_sym=a_sym, w_sym=w_sym, a_grid=grid, a_clip_ratio=0.9))
    x = torch.randn(3, 7, 256) + 0.3  # off-centre: asymmetric activations get nonzero zero points
    module = real.real_linear(layer, "int8", "layer")
    assert isinstance(module, real.Int8Linear) and module.qweight.dtype == torch.int8
    assert (module.w_offset is not None) == (not w_sym)
    assert rel(module(x), layer(x)) < 1e-5


@pytest.mark.parametrize("in_features,group", [(256, 128), (576, 128), (96, 32), (512, 256)])
def test_int4_layer_equals_fake_layer(in_features, group):
    """Asymmetric groups (GPTQ/AWQ's zero points), widths that are not a multiple of the kernel's
    (zero-padded) nor of the group (a shorter last group, as the fake quantizer makes)."""
    lin = torch.nn.Linear(in_features, 64, bias=False)
    lin.weight.data = fake_quant(lin.weight.data, 4, False, group, 1.0, "absmax")
    layer = QuantLinear(lin, QuantSpec.parse(f"w4a16g{group}"))
    module = real.real_linear(layer, "int4", "layer")
    x = torch.randn(5, in_features)
    assert isinstance(module, real.Int4Linear)
    assert rel(module(x), layer(x)) < 1e-2  # the kernel's bf16 activations, scales, zeros and output
    assert rel(F.linear(x, module.dequantized()[:, :in_features].float()), layer(x)) < 1e-2  # the dense path


def test_int8_layer_with_an_unquantized_input_stays_fake():
    lin = torch.nn.Linear(64, 32, bias=False)
    lin.weight.data = fake_quant(lin.weight.data, 8, True, None, 1.0, "absmax")
    layer = QuantLinear(lin, QuantSpec.parse("w8a8"), quantize_input=False)
    assert real.real_linear(layer, "int8") is None


def test_a_layer_without_exact_codes_is_refused():
    layer = QuantLinear(torch.nn.Linear(256, 32), QuantSpec.parse("w4a16g128"))  # weights not quantized
    with pytest.raises(real.RealRuntimeError, match="no exact 4-bit integer codes"):
        real.real_linear(layer, "int4", "blocks.0.q_proj")


# ---------------------------------------------------------------------------------- models


def quantized_model(*overrides):
    spec = spec_of(*overrides)
    model, _ = pipeline.quantized_model(spec, {}, None)
    return spec, model.eval()


@pytest.mark.parametrize("model_name", ["tiny_random_llada", "tiny_llada_instruct"])
@pytest.mark.parametrize("method,bits", [("rtn", "w4a16g128"), ("smoothquant", "w8a8")])
def test_real_model_logits_match_fake(model_name, method, bits):
    spec, model = quantized_model(f"model={model_name}", f"method={method}", f"bits={bits}")
    fmt = real.plan(spec.quant, "cpu", spec.dtype)["format"]
    ids = torch.randint(2, 200, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake = model(ids)
        info = real.convert(model, fmt)
        out = model(ids)
    assert info["layers_real"] == 7 * len(model.blocks) and info["layers_fake"] == 0
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    assert ((out - fake).norm() / fake.norm()).item() < 5e-2
    assert (out.argmax(-1) == fake.argmax(-1)).float().mean().item() >= 0.95


def test_real_w4a16_weights_take_under_0_3_of_bf16():
    _, model = quantized_model("model=tiny_llada_instruct", "method=rtn", "bits=w4a16g128")
    real.convert(model, "int4")
    sizes = real.linear_bytes(model)
    assert sizes["bf16_quantized_linear_bytes"] == 2 * sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, real.Int4Linear))
    assert sizes["quantized_linear_bytes"] <= 0.3 * sizes["bf16_quantized_linear_bytes"]
    assert sizes["weight_ratio_vs_bf16"] <= 0.3


# ------------------------------------------------------------------------ keys and errors


def test_record_key_unchanged_for_fake_and_different_for_real():
    base = config(*CALIB, "method=rtn", "bits=w4a16g128")
    without = {k: v for k, v in base.items() if k != "runtime"}
    fake, old, real_spec = (runspec.build(c) for c in (base, without, {**base, "runtime": "real"}))
    assert "runtime" not in fake.semantic()
    assert spec_key(fake.semantic()) == spec_key(old.semantic())
    assert spec_key(real_spec.semantic()) != spec_key(fake.semantic())
    assert real_spec.quantization_key() == fake.quantization_key()  # one artifact for both runtimes
    caches = [request_cache.for_run(s, "store").folder for s in (fake, old, real_spec)]
    assert caches[0] == caches[1] != caches[2]  # real runs never read back the fake run's generations
    fp = config("method=fp")
    assert spec_key(runspec.build({**fp, "runtime": "real"}).semantic()) == spec_key(runspec.build(fp).semantic())


@pytest.mark.parametrize("bits,fix", [("w4a16", "group size"), ("w4a16g16", "group size"),
                                      ("w8a8g128", "use bits=w8a8"), ("w3a16g128", "no low-bit kernel"),
                                      ("w8a16", "no low-bit kernel"), ("w6a8", "no low-bit kernel")])
def test_a_setting_without_kernel_fails_before_loading(monkeypatch, bits, fix):
    def no_load(*args, **kwargs):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(pipeline, "load_fp_model", no_load)
    with pytest.raises(runspec.ConfigError, match=fix) as err:
        pipeline.run(config(*CALIB, "method=rtn", f"bits={bits}", "runtime=real"), store_root="/nonexistent/x")
    assert "runtime=fake" in str(err.value) or "bits=" in str(err.value)


def test_unknown_runtime_is_refused():
    with pytest.raises(runspec.ConfigError, match="valid: fake, real"):
        runspec.build(config("runtime=fast"))


@pytest.mark.parametrize("bits", ["w4a4", "w4a8"])
def test_w4a4_and_w4a8_run_fake_with_the_reason(bits):
    spec = spec_of("method=rtn", f"bits={bits}", "runtime=real")
    p = real.plan(spec.quant, "cuda", "bfloat16")
    assert p["format"] is None and "no int4 tensor-core" in p["fake_reason"]


def test_real_run_records_runtime_memory_and_latency(tmp_path):
    cfg = config(*CALIB, "method=rtn", "bits=w4a16g128", "runtime=real")
    record = pipeline.run(cfg, store_root=tmp_path)
    assert record["status"] == "done", record["error"]
    rt = record["runtime"]
    assert rt["runtime"] == "real" and rt["format"] == "int4" and rt["layers_real"] > 0
    assert rt["weight_ratio_vs_bf16"] <= 0.3 and rt["forward_ms"] > 0
    assert record["spec"]["runtime"] == "real"
    fake = pipeline.run({**cfg, "runtime": "fake"}, store_root=tmp_path)
    assert fake["key"] != record["key"] and fake["runtime"]["runtime"] == "fake"
    assert fake["artifact"]["loaded"]  # the real run's artifact: one quantization for both
    w4a4 = pipeline.run(config(*CALIB, "method=rtn", "bits=w4a4", "runtime=real"), store_root=tmp_path)
    assert w4a4["status"] == "done" and "no int4 tensor-core" in w4a4["runtime"]["fake_reason"]


def test_a_fake_run_folds_the_online_transforms_of_unquantized_inputs(tmp_path):
    weight_only = pipeline.run(config(*CALIB, "method=duquant", "bits=w4a16g128", "method.steps=4"),
                               store_root=tmp_path)
    assert weight_only["status"] == "done", weight_only["error"]
    assert weight_only["runtime"]["transforms_folded"] == 7 * 2  # q/k/v, o, gate/up, down of 2 blocks
    w8a8 = pipeline.run(config(*CALIB, "method=duquant", "bits=w8a8", "method.steps=4"), store_root=tmp_path)
    assert w8a8["runtime"]["transforms_folded"] == 0


# ---------------------------------------------------------------------------------- bench


def test_runtime_bench_runs_every_format_and_records_failures(tmp_path, monkeypatch):
    monkeypatch.setattr(real.Fp8Linear, "from_weight", classmethod(lambda cls, w, b=None: 1 / 0))
    result = bench_runtime.run(["shape=tiny-llada", "exact_batch=2", "exact_len=64", "decode_batches=1",
                                "warmup=0", "repeats=1", "e2e_batch=2", "prompt_len=16", "gen_length=32",
                                "steps=2", "decoders=exact,dual_cache"])
    rows = result["formats"]
    assert set(rows) == {"bf16", "int8", "fp8", "int4"}
    assert "ZeroDivisionError" in rows["fp8"]["error"]
    for fmt in ("bf16", "int8", "int4"):
        assert rows[fmt]["exact"]["ms"] > 0 and rows[fmt]["decode_b1"]["ms"] > 0
        assert rows[fmt]["e2e"]["dual_cache"]["samples_per_s"] > 0
    assert rows["int4"]["weight_ratio_vs_bf16"] <= 0.3 and result["targets"]["w4a16_weight_ratio"]["met"]
    shapes = result["linears"]  # q/k/v/o share one shape, gate/up another, down a third
    assert {n: (r["in"], r["out"]) for n, r in shapes.items()} == {
        "q_proj": (128, 128), "gate_proj": (128, 256), "down_proj": (256, 128)}
    q = shapes["q_proj"]
    assert q["rows"] == 2 * 64 and q["int8_ms"] > 0 and q["int8_gemm_ms"] > 0 and q["int4_ms"] > 0
    assert "ZeroDivisionError" in q["fp8_error"] and q["int8_x_bf16"] == round(q["bf16_ms"] / q["int8_ms"], 3)
    json.dumps(result)
