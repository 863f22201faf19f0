"""The decode axis: fast decoders (qdlm_bench.decoders) against exact decoding, their cost model,
their configuration and record keys, the Fast decoding table and the decode benchmark."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf

from qdlm_bench import cost, decode_report, findings, methods, runspec
from qdlm_bench.bench import decode as decode_bench
from qdlm_bench.decoders.config import DecodeConfig
from qdlm_bench.decoders.counting import ForwardCounter
from qdlm_bench.decoders.samplers import generate
from qdlm_bench.diffusion import StopRule
from qdlm_bench.evaluation import EvalSettings, adapter
from qdlm_bench.generation import GenerationConfig
from qdlm_bench.models import DLLMConfig
from qdlm_bench.models.checkpoint import load_model
from qdlm_bench.models.presets import random_model
from qdlm_bench.models.transformer import KVCache
from qdlm_bench.paths import ZOO_DIR
from qdlm_bench.quant import QuantSpec
from qdlm_bench.store import baseline_key, spec_key

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 5, 9, 3, 4], [7, 8, 2], [3, 11, 40, 2, 9, 9, 1, 6, 30]]  # three lengths: left padding


def quantized(shape: str):
    """QuaRot W4A4 KV4 (online Hadamards, Q/K rotation, K/V quantizers): what a cache must keep."""
    model = random_model(shape, seed=1).eval()
    calib = SimpleNamespace(input_ids=torch.randint(0, 126, (4, 16), generator=torch.Generator().manual_seed(0)))
    methods.get("quarot")(model, QuantSpec.parse("w4a4kv4"), calib)
    return model


MODELS = {"llada": lambda: random_model("tiny-llada", seed=1).eval(),
          "dream": lambda: random_model("tiny-dream", seed=1).eval(),
          "llada-quarot-w4a4kv4": lambda: quantized("tiny-llada"),
          "dream-quarot-w4a4kv4": lambda: quantized("tiny-dream")}


def run(model, cfg, decode, prompts=PROMPTS, finished=None):
    g = torch.Generator().manual_seed(0)
    with ForwardCounter(model) as counter:
        out = generate(model, prompts, cfg, decode, batch_size=len(prompts), generator=g, finished=finished)
    return out, counter


def gen_config(model, **kw):
    # Dream's exact sampler decodes the whole answer as one block: a cached decoder equals it with one block
    block = 32 if model.config.family == "dream" else 8
    return GenerationConfig(**{"gen_length": 32, "steps": 16, "block_length": block, **kw})


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_exact_decoding(name, cache):
    model = MODELS[name]()
    for temperature in (0.0, 1.0):
        cfg = gen_config(model, temperature=temperature)
        exact, counted_exact = run(model, cfg, DecodeConfig())
        out, counted = run(model, cfg, DecodeConfig(cache=cache, refresh=1))
        assert out == exact
        assert counted.calls == counted_exact.calls
        assert all(t != model.config.mask_token_id for row in out for t in row)


@pytest.mark.parametrize("name", ["llada", "dream-quarot-w4a4kv4"])
def test_block_wise_cache_is_an_approximation_that_costs_less(name):
    model = MODELS[name]()
    cfg = gen_config(model)
    exact, counted_exact = run(model, cfg, DecodeConfig())
    flops = {}
    for cache in ("prefix", "dual"):
        out, counted = run(model, cfg, DecodeConfig(cache=cache))
        assert counted.calls == counted_exact.calls and counted.flops < counted_exact.flops
        flops[cache] = counted.flops
        assert all(t != model.config.mask_token_id for row in out for t in row)
    assert flops["dual"] <= flops["prefix"]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cached_forward_reuses_the_cache_for_columns_outside_fresh(family):
    """Nothing changed: a cached forward's logits are the full forward's. The block changed: the
    columns outside ``fresh`` keep their stale K/V, so the logits move off the full forward's."""
    model = MODELS[family]()
    x = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(3))
    attn = torch.ones_like(x)
    attn[0, :3] = 0
    block, fresh = slice(12, 20), slice(12 - model.config.shift_logits, 20)
    cache = KVCache(len(model.blocks))
    with torch.no_grad():
        full = model(x, attention_mask=attn, positions=block, cache=cache)
        assert torch.equal(full, model(x, attention_mask=attn, positions=block))  # the plain forward
        again = model(x, attention_mask=attn, positions=block, cache=cache, fresh=fresh)
        assert torch.allclose(again, full, atol=1e-5)
        y = x.clone()
        y[:, block] = model.config.mask_token_id
        stale = model(y, attention_mask=attn, positions=block, cache=cache, fresh=fresh)
        assert not torch.allclose(stale, model(y, attention_mask=attn, positions=block), atol=1e-3)
    with pytest.raises(ValueError, match="positions"):
        model(x, positions=slice(0, 4), cache=cache, fresh=fresh)


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_parallel_above_one_equals_exact_one_token_per_step(cache):
    model = MODELS["llada"]()
    cfg = gen_config(model, steps=32)  # steps = gen_length: one token per step
    exact, _ = run(model, cfg, DecodeConfig())
    out, counted = run(model, cfg, DecodeConfig(cache=cache, threshold=1.5, refresh=None if cache == "none" else 1))
    assert out == exact and counted.calls == 32


def test_parallel_unmasks_every_confident_token_at_once():
    """A threshold of 0 takes every masked token of a block at its first step: one pass per block
    (rows decide alone); the steps setting is ignored."""
    model = MODELS["llada"]()
    cfg = gen_config(model)
    out, counted = run(model, cfg, DecodeConfig(threshold=1e-9))
    assert counted.calls == cfg.gen_length // cfg.block_length
    assert all(t != model.config.mask_token_id for row in out for t in row)


@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.parametrize("decode", [DecodeConfig(), DecodeConfig(cache="prefix"), DecodeConfig(cache="dual"),
                                    DecodeConfig(cache="dual", refresh=3), DecodeConfig(cache="prefix", threshold=2.0)])
def test_planned_cost_equals_the_counted_work(name, decode):
    model = MODELS[name]()
    cfg = GenerationConfig(gen_length=32, steps=16, block_length=8)
    prompts = [[1, 2, 3, 4, 5]] * 3
    _, counted = run(model, cfg, decode, prompts)
    planned = cost.generation_cost(model.config, [5] * 3, cfg, 3, decode)
    assert planned.passes == counted.calls and planned.rows == counted.rows
    assert planned.flops == pytest.approx(counted.flops, rel=1e-9)
    assert planned.approx == (decode.threshold is not None)


def test_unsupported_settings_fail_before_decoding():
    model = MODELS["llada"]()
    fast = DecodeConfig(cache="prefix", threshold=0.9)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        generate(model, PROMPTS, gen_config(model, cfg_scale=1.0), fast)
    with pytest.raises(ValueError, match="remasking=random"):
        generate(model, PROMPTS, gen_config(model, remasking="random"), fast)
    with pytest.raises(ValueError, match="origin"):
        generate(MODELS["dream"](), PROMPTS, gen_config(model, alg="origin"), fast)
    for bad, match in (({"cache": "full"}, "decode.cache"), ({"threshold": -1}, "decode.threshold"),
                       ({"threshold": "high"}, "decode.threshold"), ({"refresh": 2}, "no cache to refresh"),
                       ({"treshold": 0.9}, "unknown decode setting")):
        with pytest.raises(ValueError, match=match):
            DecodeConfig.from_dict(bad)


# ----------------------------------------------------------------------------- config and keys


def config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_decode_enters_the_record_key_only_when_not_exact():
    specs = {d: runspec.build(config("method=rtn", f"decode={d}"))
             for d in ("exact", "prefix_cache", "dual_cache", "parallel", "prefix_cache_parallel", "dual_cache_parallel")}
    exact = specs["exact"].semantic()
    assert "decode" not in exact["eval"]
    legacy = config("method=rtn")
    legacy.pop("decode")  # a configuration from before the axis: the same record
    assert spec_key(runspec.build(legacy).semantic()) == spec_key(exact)
    keys = {spec_key(s.semantic()) for s in specs.values()}
    baselines = {baseline_key(s.semantic()) for s in specs.values()}
    assert len(keys) == len(baselines) == 6  # a record (and an FP baseline) of one decoder never serves another
    assert specs["prefix_cache_parallel"].decode == DecodeConfig(cache="prefix", threshold=0.9)
    assert specs["parallel"].settings.decode.label == "parallel0.9"


def test_bad_decode_config_is_a_config_error():
    with pytest.raises(runspec.ConfigError, match="decode.cache='full'"):
        runspec.build(config("decode.cache=full"))
    with pytest.raises(runspec.ConfigError, match="task mini_math: decode=parallel0.9 does not implement"):
        runspec.build(config("decode=parallel", "tasks=[mini_math]", "+eval.generation={mini_math:{cfg_scale:1.0}}"))


# ------------------------------------------------------------------------------- report, bench


def record(method, bits, decode, math_acc, code_acc, seconds, passes, created):
    spec = {"model": {"name": "m"}, "tasks": ["mini_math", "mini_code"], "dtype": "float32", "seed": 0,
            "eval": {"limit": 8, **({} if decode is None else {"decode": decode})}}
    gen = {"samples": 8, "seconds": seconds, "forward_passes_per_sample": passes}
    return {"status": "done", "model": "m", "method": method, "bits": bits, "spec": spec, "created": created,
            "precision": {"w_bits": 16 if method == "fp" else 4, "a_bits": 16},
            "metrics": {"mini_math": {"value": math_acc, "generation": gen},
                        "mini_code": {"value": code_acc, "generation": gen}}}


def test_fast_decoding_table_and_findings():
    fast = {"cache": "prefix", "threshold": 0.9, "refresh": None}
    records = [record("fp", None, None, 0.80, 0.60, 16.0, 256, "1"),
               record("fp", None, fast, 0.80, 0.58, 4.0, 40, "2"),
               record("rtn", "w4a16g128", None, 0.70, 0.50, 16.0, 256, "3"),
               record("rtn", "w4a16g128", fast, 0.60, 0.40, 16.0, 200, "4"),  # replaced by the next (latest)
               record("rtn", "w4a16g128", fast, 0.65, 0.45, 8.0, 60, "5")]
    [table] = decode_report.fast_decoding_tables(records)
    assert list(table["decode"]) == ["exact", "prefix_cache+parallel0.9", "exact", "prefix_cache+parallel0.9"]
    fp_fast, q_fast = table.iloc[1], table.iloc[3]
    assert fp_fast[decode_report.DELTA] == pytest.approx(-1.0) and fp_fast[decode_report.SPEEDUP] == pytest.approx(4.0)
    assert q_fast[decode_report.DELTA] == pytest.approx(-5.0) and q_fast[decode_report.DELTA_FP] == pytest.approx(-1.0)
    assert q_fast[decode_report.SPEEDUP] == pytest.approx(2.0) and q_fast[decode_report.FORWARDS] == 60
    fp_ok, same = findings.fast_decoding([table])
    assert fp_ok.verdict == findings.HOLDS and same.verdict == findings.FAILS
    assert decode_report.fast_decoding_tables(records[:1] + records[2:3]) == []  # exact only: no table


def test_decode_bench_on_cpu():
    r = decode_bench.run(["shape=tiny-llada", "batches=1,2", "prompt_len=12", "gen_length=16", "steps=16",
                          "block_length=8", "batch1_prompts=1", "decoders=exact,prefix_cache,dual_cache_parallel"])
    for batch in ("batch1", "batch2"):
        rows = r[batch]
        assert rows["exact"]["speedup"] == 1.0 and rows["exact"]["same_tokens_as_exact"] == 1.0
        assert rows["exact"]["forward_passes_per_sample"] == 16
        assert rows["prefix_cache"]["forward_passes_per_sample"] == 16
        assert all(v["samples_per_s"] > 0 and v["tflops"] > 0 for v in rows.values())
    assert r["batch2"]["dual_cache_parallel"]["decode"] == "dual_cache+parallel0.9"


def test_plain_forward_is_untouched_by_the_cache_argument():
    model = MODELS["dream-quarot-w4a4kv4"]()
    x = torch.randint(0, 120, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = copy.deepcopy(model)(x)
        assert torch.equal(model(x, cache=KVCache(len(model.blocks))), ref)


def test_a_cached_batch_of_one_decoder_never_serves_another(tmp_path):
    """The request cache keys generation batches by the decoder's label: exact decoding's stored
    batches are not read back for a fast decoder (nor one fast decoder's for another)."""
    from qdlm_bench.evaluation.request_cache import TaskCache

    model = MODELS["llada"]()
    cfg = gen_config(model)
    cache = TaskCache(tmp_path / "t.sqlite", {"quantization_key": "0" * 16, "dtype": "float32", "device": "cpu"})
    outs = {}
    for decode in (DecodeConfig(), DecodeConfig(cache="dual"), DecodeConfig(cache="prefix", threshold=0.5)):
        outs[decode.label] = generate(model, PROMPTS, cfg, decode, batch_size=2, generator=torch.Generator(), cache=cache)
    assert cache.hits == 0 and cache.misses == 6 and len(cache) == 6  # 2 batches per decoder, none shared
    again = generate(model, PROMPTS, cfg, DecodeConfig(cache="dual"), batch_size=2, generator=torch.Generator(),
                     cache=cache)
    assert again == outs["dual_cache"] and cache.hits == 2
    cache.close()


def test_the_adapter_decodes_with_the_run_decoder_and_keeps_its_timings():
    from lm_eval.api.instance import Instance

    from qdlm_bench.evaluation import EvalSettings, adapter
    from qdlm_bench.models.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    model = random_model(DLLMConfig(family="llada", vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4,
                                    n_kv_heads=4, d_ff=64, mask_token_id=tok.convert_tokens_to_ids("<|mask|>"),
                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    requests = [Instance(request_type="generate_until", doc={}, arguments=(q, {"until": []}), idx=0,
                         metadata=("mini_math", i, 1)) for i, q in enumerate(["1+1=", "22+3=", "4*5="])]
    stats = {}
    for decode in (DecodeConfig(), DecodeConfig(cache="prefix", threshold=1e-9)):
        settings = EvalSettings.from_dict({"generation": {"mini_math": {"gen_length": 16, "steps": 16,
                                                                        "block_length": 8}}})
        settings.decode = decode
        lm = adapter.DiffusionLMAdapter(model, tok, settings)
        lm.generate_until(requests)
        stats[decode.label] = lm.generation_stats["mini_math"]
    assert stats["exact"]["forward_passes_per_sample"] == 16 and stats["exact"]["samples"] == 3
    fast = stats["prefix_cache+parallel1e-09"]
    assert fast["decode"] == "prefix_cache+parallel1e-09" and fast["forward_passes_per_sample"] == 2  # a pass per block
    assert fast["samples_per_s"] > 0 and fast["tflops"] > 0


def test_the_report_names_each_table_decoder_and_adds_the_fast_decoding_table(tmp_path, capsys):
    from qdlm_bench import report
    from qdlm_bench.store import new_record

    def make(method, decode, acc, seconds):
        spec = {"model": {"name": "m"}, "method": {"name": method}, "tasks": ["mini_math"], "dtype": "float32",
                "seed": 0, "quant": {"bits": "fp16" if method == "fp" else "w4a16g128", "exclude": []},
                "eval": {"limit": 4, **({"decode": decode.as_dict()} if not decode.is_exact else {})}}
        gen = {"decode": decode.label, "samples": 4, "seconds": seconds, "forward_passes_per_sample": 8}
        return new_record(spec, status="done", metrics={"mini_math": {"metric": "exact_match,none", "value": acc,
                                                                        "stderr": 0.1, "generation": gen}})

    fast = DecodeConfig(cache="prefix", threshold=0.9)
    records = [make("fp", DecodeConfig(), 0.75, 8.0), make("rtn", DecodeConfig(), 0.5, 8.0),
               make("fp", fast, 0.75, 2.0), make("rtn", fast, 0.25, 4.0)]
    tables = report.study_tables(report.records_frame(records))
    assert [t.attrs["title"] for t in tables] == ["m", "m decode=prefix_cache+parallel0.9"]
    assert [list(t["decode"]) for t in tables] == [["exact", "exact"], ["prefix_cache+parallel0.9"] * 2]
    assert all(t[report.DROP].notna().all() for t in tables)  # each decoder's runs against its own FP
    report.make_report(records, tmp_path, ["md"])
    text = (tmp_path / "report.md").read_text()
    assert "## Fast decoding: m" in text and "prefix cache + parallel decoding keeps FP" in text
    assert (tmp_path / "fast-decoding-m.md").is_file()
    exact_only = report.study_tables(report.records_frame(records[:2]))
    assert "decode" not in exact_only[0]  # a store without fast decoders: the tables as before


def stop_at(token_ids) -> StopRule:
    return StopRule(frozenset(token_ids), (), str)


@pytest.mark.parametrize("decode", [DecodeConfig(), DecodeConfig(cache="prefix"),
                                    DecodeConfig(cache="dual", threshold=0.9)], ids=lambda d: d.label)
def test_a_batch_whose_rows_are_all_finished_skips_its_later_blocks(decode):
    model = MODELS["llada"]()
    cfg, mask = gen_config(model), model.config.mask_token_id  # 4 blocks of 8, 4 steps each
    full, counted_full = run(model, cfg, decode)
    out, counted = run(model, cfg, decode, finished=stop_at(t for row in full for t in row[:8]))
    assert [row[:8] for row in out] == [row[:8] for row in full]
    assert all(t == mask for row in out for t in row[8:])
    assert 0 < counted.calls < counted_full.calls
    if decode.is_exact:
        assert (counted.calls, counted_full.calls) == (4, 16)


def test_finished_rows_leave_the_exact_batch_and_the_others_decode_as_before():
    model = MODELS["llada"]()
    cfg, mask = gen_config(model), model.config.mask_token_id  # 4 blocks of 8, 4 steps each
    full, counted_full = run(model, cfg, DecodeConfig())
    rule = stop_at({t for row in full[:2] for t in row} - set(full[2]))
    ends = [next((n for n in (8, 16, 24) if rule(row[:n])), 32) for row in full]  # the block after which each row leaves
    assert ends[2] == 32 and max(ends[:2]) < 32
    out, counted = run(model, cfg, DecodeConfig(), finished=rule)
    assert out[2] == full[2]  # computed without the rows that left: the same tokens
    assert all(out[r][:ends[r]] == full[r][:ends[r]] and set(out[r][ends[r]:]) == {mask} for r in (0, 1))
    assert counted.rows == sum(4 * (end // 8) for end in ends) < counted_full.rows == 3 * 16
    # the fast decoders keep a batch together until every row is finished
    fast = DecodeConfig(cache="prefix")
    assert run(model, cfg, fast, finished=rule)[0] == run(model, cfg, fast)[0]


@pytest.mark.parametrize("kw", [{"temperature": 1.0}, {"remasking": "random"}])
def test_a_sampler_that_draws_random_numbers_never_stops_early(kw):
    """A skipped block would not draw its random numbers, and the next batch would draw others."""
    model = MODELS["llada"]()
    cfg = gen_config(model, **kw)
    full, counted_full = run(model, cfg, DecodeConfig())
    out, counted = run(model, cfg, DecodeConfig(), finished=stop_at(range(model.config.vocab_size)))
    assert out == full and counted.calls == counted_full.calls


def test_the_dream_sampler_decodes_one_block_and_never_stops_early():
    model = MODELS["dream"]()
    cfg = gen_config(model)
    full, _ = run(model, cfg, DecodeConfig())
    assert run(model, cfg, DecodeConfig(), finished=stop_at(range(model.config.vocab_size)))[0] == full


def test_stopping_early_keeps_every_answer_of_a_trained_model():
    """The shipped instruct model on mini_math prompts: the adapter's answers (cut at EOS and the
    stop strings) are the same with and without the stop rule, at fewer forward passes."""
    model, tok = load_model(ZOO_DIR / "tiny-llada-instruct", dtype=torch.float32)
    lm = adapter.DiffusionLMAdapter(model.eval(), tok, EvalSettings.from_dict({"batch_size": 4}))
    rows = [json.loads(line) for line in (ROOT / "tasks/mini/mini_math.jsonl").read_text().splitlines()[:8]]
    until = ["Question:", "\n\n", "<|endoftext|>"]
    gen = {"until": until, "max_gen_toks": 64, "steps": 64, "block_length": 32}
    reqs = [Instance(request_type="generate_until", doc={}, idx=0, metadata=("mini_math", i, 1),
                     arguments=(lm.apply_chat_template([{"role": "user", "content": f"Question: {r['question']}\nAnswer:"}]),
                                gen)) for i, r in enumerate(rows)]
    with ForwardCounter(model) as counted:
        answers = lm.generate_until(reqs)
    lm.stop_rule = lambda untils: None
    with ForwardCounter(model) as counted_full:
        assert lm.generate_until(reqs) == answers
    assert sum("####" in a for a in answers) >= 6
    assert counted.calls < counted_full.calls == 2 * 64
