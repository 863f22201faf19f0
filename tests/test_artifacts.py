"""Quantized artifacts (issue 12, item 1): a quantization is computed once, saved, and loaded by every
later run, task job and analysis; loading reproduces the in-memory model exactly."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_pipeline import config

from qdlm_bench import analysis, artifacts, methods, pipeline, plan, runspec
from qdlm_bench.artifacts import ArtifactError, ArtifactStore, codes, layout
from qdlm_bench.models.factory import load_fp_model
from qdlm_bench.models.presets import SHAPES
from qdlm_bench.quant.quantizer import fake_quant
from qdlm_bench.quant.spec import QuantSpec

CTX = multiprocessing.get_context("fork")
CALIB = ["calib.n_samples=4", "calib.seqlen=32"]
FAST = {"awq": ["method.n_grid=4"], "duquant": ["method.steps=4", "method.max_tokens=64"],
        "dllmquant": ["method.tmas=false"]}


def spec_of(*overrides: str) -> runspec.RunSpec:
    return runspec.build(config(*CALIB, *overrides))


def quantized(spec):
    model, tokenizer = load_fp_model(spec.model, spec.dtype, spec.device, spec.seed)
    info = pipeline.quantize(spec, model, tokenizer)
    return model.eval(), info


def save(store: ArtifactStore, spec, model, info=None) -> dict:
    with store.lock(spec.quantization_key()):
        return store.save(spec, model, info)


def assert_same_model(a, b):
    """Every state tensor bit-equal, the same modules, float32 logits equal."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(codes.bit_equal(sa[k], sb[k]) for k in sa)
    assert str(a) == str(b)
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(ids).float(), b(ids).float())


# ------------------------------------------------------------------------- integer codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", ["absmax", "gptq", "duquant"])
def test_codes_are_recovered_exactly_from_fake_quantized_weights(grid, dtype):
    """Every grid, 3/4/8 bits, symmetric and not, per row and in groups (one shorter), with a
    one-signed row and an all-zero row: the recovered codes dequantize to the same bits."""
    g = torch.Generator().manual_seed(0)
    for bits, sym, group_size in [(4, False, 32), (4, True, None), (3, False, None), (8, False, 48), (8, True, 32)]:
        w = (torch.randn(16, 80, generator=g) * 0.05).to(dtype)
        w[3] = w[3].abs() + 0.3
        w[5] = 0
        q = fake_quant(w, bits, sym, group_size, clip_ratio=0.9 if grid == "duquant" else 1.0, grid=grid)
        found = codes.recover(q, bits, group_size)
        assert found is not None, (bits, sym, group_size)
        assert int(found.codes.max()) <= 2**bits - 1
        assert codes.bit_equal(codes.dequantize(found.codes, found.scale, found.zero, group_size, dtype), q)


def test_weights_that_are_not_on_a_grid_have_no_codes():
    w = torch.randn(8, 64)
    assert codes.recover(w, 4, 32) is None
    assert codes.recover(fake_quant(w, 8, False, 32), 4, 32) is None  # 8-bit codes are no 4-bit ones


@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_round_trips_and_int4_is_two_per_byte_and_eight_per_word(bits):
    c = torch.randint(0, 2**bits, (5, 37), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    assert torch.equal(codes.unpack_bytes(codes.pack_bytes(c, bits), bits, 37), c)
    assert torch.equal(codes.unpack_int32(codes.pack_int32(c, bits), bits, 37), c)
    if bits == 4:
        assert codes.pack_bytes(c, 4).shape == (5, 19) and codes.pack_int32(c, 4).shape == (5, 5)
        assert int(codes.pack_bytes(c, 4)[0, 0]) == int(c[0, 0]) | int(c[0, 1]) << 4
        word = sum(int(c[0, i]) << (4 * i) for i in range(8))
        assert int(codes.pack_int32(c, 4)[0, 0]) == (word - 2**32 if word >= 2**31 else word)


# ------------------------------------------------------------------------- exact reload

CASES = [(m, b) for m in ("rtn", "gptq", "awq", "smoothquant", "quarot", "duquant", "dllmquant")
         for b in ("w4a16g128", "w4a4kv4")]
CASES += [("rtn", "w8a8"), ("quarot", "w8a8"), ("rtn", "w4a16g128", "model=tiny_random_dream"),
          ("quarot", "w4a4kv4", "model=tiny_random_dream"), ("gptq", "w4a16g128", "dtype=bfloat16"),
          ("rtn", "w8a8", "dtype=bfloat16")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(x.split("=")[-1] for x in c))
def test_loading_an_artifact_reproduces_the_quantized_model_exactly(case, tmp_path):
    method, bits, *extra = case
    spec = spec_of(f"method={method}", f"bits={bits}", *FAST.get(method, []), *extra)
    model, info = quantized(spec)
    store = ArtifactStore(tmp_path)
    manifest = save(store, spec, model, info)
    assert manifest["sizes"]["dense_layers"] == 0 and manifest["sizes"]["packed_layers"] == 14  # 2 blocks x 7
    plain = spec.quant.weight_only and method in ("rtn", "gptq", "awq", "smoothquant", "dllmquant")
    assert manifest["format"] == (layout.CT_FORMAT if plain else layout.OWN_FORMAT), manifest["format_note"]
    loaded, tokenizer, _ = store.load(spec)
    assert_same_model(model, loaded)
    assert tokenizer("ab")["input_ids"]
    files = sorted(p.name for p in store.path_for(spec.quantization_key()).iterdir())
    assert files == sorted(["manifest.json", "model.safetensors", *(["config.json"] if plain else [])])


def test_a_layer_without_an_exact_integer_form_is_kept_unpacked_and_named(tmp_path):
    """GPTQ with act_order (no static groups) quantizes groups of permuted columns: down_proj's two
    groups are not contiguous, so it is stored in float32, and the manifest says why."""
    spec = spec_of("method=gptq", "bits=w4a16g128", "method.act_order=true")
    model, info = quantized(spec)
    manifest = save(ArtifactStore(tmp_path), spec, model, info)
    dense = {n: layer for n, layer in manifest["layers"].items() if layer["storage"] == "dense"}
    assert set(dense) == {"blocks.0.down_proj", "blocks.1.down_proj"}  # in=256: two groups of 128
    assert all("no exact 4-bit form" in layer["reason"] for layer in dense.values())
    assert_same_model(model, ArtifactStore(tmp_path).load(spec)[0])


def test_a_module_the_format_cannot_describe_is_refused(tmp_path):
    spec = spec_of("method=rtn", "bits=w4a16")
    model, _ = quantized(spec)
    model.blocks[0].qk_rotate = torch.nn.Tanh()
    with pytest.raises(ArtifactError, match="blocks.0.qk_rotate is a torch.nn.modules.activation.Tanh"):
        save(ArtifactStore(tmp_path), spec, model)
    assert not list(tmp_path.iterdir()) or list(tmp_path.iterdir()) == [tmp_path / ".locks"]


# ------------------------------------------------------------------------- compressed-tensors


@pytest.mark.parametrize("bits", ["w4a16g128", "w8a16", "w4a16g64_sym", "w3a16g128"])
def test_compressed_tensors_reads_back_what_we_wrote(bits, tmp_path):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    from qdlm_bench.models.layout import key_map

    spec = spec_of("method=rtn", f"bits={bits}")
    model, _ = quantized(spec)
    manifest = save(ArtifactStore(tmp_path), spec, model)
    assert manifest["format"] == layout.CT_FORMAT
    folder = tmp_path / spec.quantization_key()
    hf = json.loads((folder / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(hf["quantization_config"])
    assert qcfg.quant_method == "compressed-tensors" and qcfg.format == "pack-quantized"
    scheme = qcfg.config_groups["group_0"]
    assert scheme.weights.symmetric == bits.endswith("_sym")
    names = key_map(model.config)
    assert qcfg.ignore == [names["lm_head.weight"][:-len(".weight")]]
    tensors = load_file(folder / "model.safetensors")
    state = model.state_dict()
    for name in manifest["layers"]:
        prefix = names[f"{name}.weight"][:-len(".weight")]
        sd = {k: tensors[f"{prefix}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                     "weight_shape") if f"{prefix}.{k}" in tensors}
        weight = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
        assert codes.bit_equal(weight.to(state[f"{name}.weight"].dtype), state[f"{name}.weight"]), name
    assert ct.__version__


# ------------------------------------------------------------------------- atomic writes, stale artifacts


def test_a_half_written_or_stale_artifact_is_never_loaded_and_is_replaced(tmp_path, caplog):
    spec = spec_of("method=rtn", "bits=w4a16g128")
    store = ArtifactStore(tmp_path)
    key = spec.quantization_key()
    folder = store.path_for(key)
    model, info = quantized(spec)
    good = save(store, spec, model, info)
    broken = {
        "no manifest": lambda: (folder / "manifest.json").unlink(),
        "truncated manifest": lambda: (folder / "manifest.json").write_text('{"format_version": 1, "ke'),
        "truncated tensors": lambda: os.truncate(folder / "model.safetensors", 1000),
        "another version": lambda: _edit(folder, versions={"qdlm_bench": "0.0.1"}),
        "other code": lambda: _edit(folder, code="0123456789abcdef"),
        "another source": lambda: _edit(folder, quantization={**good["quantization"],
                                                              "model": {"source": "local:other"}}),
    }
    for name, damage in broken.items():
        save(store, spec, model, info)
        assert store.has(spec)
        damage()
        manifest, why = store.check(spec)
        assert manifest is None and why, name
        assert not plan.has_artifact(spec, {"store": str(tmp_path.parent), "artifacts": str(tmp_path)})
        used: dict = {}
        with caplog.at_level(logging.WARNING, logger="qdlm_bench"):
            pipeline.quantized_model(spec, {}, tmp_path, used=used)
        assert used["artifact"]["saved"] and not used["artifact"]["loaded"], name
        assert "not loading artifact" in caplog.text
        caplog.clear()
        assert store.has(spec) and store.manifest(key)["id"] != good["id"]
        assert_same_model(model, store.load(spec)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", key]  # nothing left aside


def _edit(folder: Path, **fields) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **fields}))


def save_then_die(root, cfg, ready):
    """Save an artifact but stop for good once its tensors are written (before its manifest)."""
    import safetensors.torch

    real = safetensors.torch.save_file

    def slow(*args, **kwargs):
        real(*args, **kwargs)
        ready.set()
        time.sleep(600)

    safetensors.torch.save_file = slow
    spec = runspec.build(cfg)
    model, info = quantized(spec)
    save(ArtifactStore(root), spec, model, info)


def test_a_writer_killed_mid_write_leaves_nothing_that_loads(tmp_path):
    cfg = config(*CALIB, "method=rtn", "bits=w4a16")
    spec = runspec.build(cfg)
    ready = CTX.Event()
    writer = CTX.Process(target=save_then_die, args=(tmp_path, cfg, ready))
    writer.start()
    assert ready.wait(120)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(60)
    store = ArtifactStore(tmp_path)
    assert store.check(spec) == (None, None)  # no artifact: only a temporary folder
    assert [p.name for p in tmp_path.glob(".tmp-*")]
    used: dict = {}
    pipeline.quantized_model(spec, {}, tmp_path, used=used)
    assert used["artifact"]["saved"] and store.has(spec)
    assert not list(tmp_path.glob(".tmp-*"))  # cleaned by the next writer (under the key's lock)


# ------------------------------------------------------------------------- one quantization for two jobs


def slow_rtn(marker):
    rtn = methods.get("rtn")

    def recipe(opts):
        def mark(state):
            with open(marker, "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(2.0)
        return [mark, *rtn.recipe(opts)]

    methods._REGISTRY["rtn"] = replace(rtn, recipe=recipe)


def need_model(root, cfg, marker, start, queue):
    slow_rtn(marker)
    spec = runspec.build(cfg)
    start.wait(60)
    used: dict = {}
    model, _ = pipeline.quantized_model(spec, {}, root, used=used)
    ids = torch.arange(24).view(2, 12)
    queue.put((used["artifact"], model(ids).float().tolist()))


def test_two_jobs_needing_one_artifact_quantize_it_once(tmp_path, caplog):
    cfg = config(*CALIB, "method=rtn", "bits=w4a16g128")
    marker = tmp_path / "quantized.txt"
    start, queue = CTX.Event(), CTX.Queue()
    jobs = [CTX.Process(target=need_model, args=(tmp_path / "artifacts", cfg, marker, start, queue))
            for _ in range(2)]
    for job in jobs:
        job.start()
    start.set()
    (a, logits_a), (b, logits_b) = queue.get(timeout=300), queue.get(timeout=300)
    for job in jobs:
        job.join(60)
        assert job.exitcode == 0
    assert len(marker.read_text().split()) == 1  # quantized once
    assert sorted([a["loaded"], b["loaded"]]) == [False, True] and a["saved"] != b["saved"]
    assert logits_a == logits_b


# ------------------------------------------------------------------------- the pipeline, plan, analyses


def test_a_second_run_of_the_same_quantization_loads_its_artifact(tmp_path):
    """GPTQ run with one task list, then another: the second loads the artifact (no calibration or
    quantization time) and its metrics equal those of the same run without artifacts."""
    common = ["method=gptq", "bits=w4a16g128", "eval.limit=2", *CALIB]
    first = pipeline.run(config(*common, "tasks=[mini_qa]"), store_root=tmp_path / "a")
    assert first["status"] == "done", first["error"]
    assert first["artifact"]["saved"] and not first["artifact"]["loaded"]
    assert {"calibrate_s", "quantize_s", "artifact_save_s"} <= set(first["timings"])
    second = pipeline.run(config(*common, "tasks=[mini_ppl]"), store_root=tmp_path / "a")
    assert second["status"] == "done", second["error"]
    assert second["artifact"] == {**first["artifact"], "loaded": True, "saved": False}
    assert Path(second["artifact"]["path"]) == tmp_path / "a" / "artifacts" / second["artifact"]["key"]
    assert "artifact_load_s" in second["timings"]
    assert not {"calibrate_s", "quantize_s", "check_s", "load_s"} & set(second["timings"])
    alone = pipeline.run(config(*common, "tasks=[mini_ppl]", "artifacts=null"), store_root=tmp_path / "b")
    assert alone["artifact"] is None and not (tmp_path / "b" / "artifacts").exists()
    assert alone["metrics"] == second["metrics"]
    fp = pipeline.run(config("method=fp", "eval.limit=2"), store_root=tmp_path / "a")
    assert fp["artifact"] is None  # FP runs load the checkpoint: no artifact
    forced = pipeline.run(config(*common, "tasks=[mini_ppl]"), store_root=tmp_path / "a", force=True)
    assert forced["artifact"]["saved"] and "quantize_s" in forced["timings"]  # force quantizes again
    assert forced["metrics"] == second["metrics"]


def test_plan_marks_runs_whose_artifact_exists(tmp_path):
    cfg = config(*CALIB, "method=rtn", "bits=w8a8", f"store={tmp_path}")
    spec = runspec.build(cfg)
    assert not plan.has_artifact(spec, cfg)
    pipeline.quantized_model(spec, {}, artifacts.root_of(cfg))
    assert plan.has_artifact(spec, cfg)
    assert not plan.has_artifact(spec, {**cfg, "artifacts": None})
    fp = config("method=fp", f"store={tmp_path}")
    assert not plan.has_artifact(runspec.build(fp), fp)


def test_analyses_load_the_artifact_a_run_saved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default store (results/) and calibration cache go here
    cfg = config(*CALIB, "method=quarot", "bits=w4a4kv4", "method.weights=rtn")
    spec = runspec.build(cfg)
    first = analysis.quantized(spec, cfg)
    assert (tmp_path / "results" / "artifacts" / spec.quantization_key() / "manifest.json").is_file()
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: pytest.fail("quantized again"))
    assert_same_model(first, analysis.quantized(spec))  # no cfg: the default results/artifacts


# ------------------------------------------------------------------------- sizes


def test_sizes_are_those_the_layout_computes(tmp_path):
    for bits, fmt in [("w4a16g128", layout.CT_FORMAT), ("w8a8", layout.OWN_FORMAT)]:
        spec = spec_of("method=rtn", f"bits={bits}")
        model, info = quantized(spec)
        manifest = save(ArtifactStore(tmp_path), spec, model, info)
        planned = layout.planned_bytes(model.config, spec.quant, spec.dtype, fmt)
        assert manifest["format"] == fmt
        assert manifest["sizes"]["tensor_bytes"] == planned["tensors"]
        assert manifest["sizes"]["fp_bytes"] == planned["fp"] == sum(p.numel() * 4 for p in model.parameters())
    # LLaDA-8B at w4a16g128 in bfloat16 (computed from the layout, no weights): 5.81 GB against 16.03 GB
    llada = layout.planned_bytes(SHAPES["llada-8b"], QuantSpec.parse("w4a16g128"), "bfloat16", layout.CT_FORMAT)
    assert llada["fp"] == 16_031_162_368
    assert llada["tensors"] == 5_807_549_952
    assert llada["packed"] == 6_979_321_856 // 2 and llada["dense"] == 2 * 126464 * 4096 * 2 + (2 * 32 + 1) * 4096 * 2


def test_the_artifact_bench_measures_and_checks_a_tiny_model(tmp_path):
    from qdlm_bench.bench import artifact

    result = artifact.run(["model=tiny_random_llada", "method=rtn", "bits=w4a16g128", f"dir={tmp_path}"])
    assert result["exact"] == {"logits_equal": True, "state_bit_equal": True, "modules_equal": True}
    assert result["sizes"]["planned_matches"] and result["later_run"]["loaded"]
    assert result["sizes"]["artifact_bytes"] < result["sizes"]["fp_bytes"]
    assert result["computed_layout"]["computed_from_layout"] and result["computed_layout"]["shape"] == "llada-8b"
