"""DLLMQuant: CGQ weights and Hessian, IA-AQ search, the method's options, end to end, the ablation sweep."""

import copy
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from qdlm_bench import methods
from qdlm_bench.methods.dllmquant import CGQOptions, IAAQOptions
from qdlm_bench import pipeline, runspec
from qdlm_bench.calibration import CalibSet, confidences
from qdlm_bench.models.presets import random_model
from qdlm_bench.models.transformer import apply_rope
from qdlm_bench.quant import ActQuantizer, QuantSpec, fake_quant
from qdlm_bench.methods.dllmquant.cgq import token_weights
from qdlm_bench.methods.dllmquant.iaaq import calibrate, head_losses

ROOT = Path(__file__).resolve().parents[1]
GEN = torch.Generator().manual_seed(0)


def calib_set(n=6, length=16, masked_frac=0.5, pad=True) -> CalibSet:
    ids = torch.randint(0, 120, (n, length), generator=GEN)
    masked = torch.rand(n, length, generator=GEN) < masked_frac
    attn = torch.ones(n, length, dtype=torch.long)
    if pad:
        attn[::2, :3] = 0
        masked &= attn.bool()
    return CalibSet(ids.masked_fill(masked, 127), masked, masked.float().mean(1), attention_mask=attn)


# --- CGQ -----------------------------------------------------------------------------------------

def test_cgq_weights_formula():
    masked = torch.tensor([[True, False, False, True]])
    conf = torch.tensor([[0.25, 0.04, 0.81, 0.0]])
    attn = torch.tensor([[1, 1, 1, 0]])
    calib = CalibSet(torch.zeros(1, 4, dtype=torch.long), masked, torch.zeros(1), attention_mask=attn, confidence=conf)
    g2 = torch.tensor([(1 + 0.5) ** 2, (0.7 + 0.2) ** 2, (0.7 + 0.9) ** 2, 0.0])
    assert torch.allclose(token_weights(calib), g2 * 3 / g2.sum())  # mean 1 over the 3 real tokens, pad 0
    zero = torch.tensor([1.5**2, 0.7**2, 0.7**2, 0.0])
    assert torch.allclose(token_weights(calib, CGQOptions(unmasked_conf="zero")), zero * 3 / zero.sum())
    with pytest.raises(ValueError, match="confidences"):
        token_weights(CalibSet(calib.input_ids, masked, torch.zeros(1)))
    with pytest.raises(ValueError, match="unmasked_conf"):
        CGQOptions(unmasked_conf="max")


def captured(monkeypatch, module, name):
    """Wrap ``module.name`` to record its (args, kwargs) per call."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    return calls


def gptq_hessians(monkeypatch, model, calib) -> list[torch.Tensor]:
    """The Hessian of every layer the gptq method would solve for (solver skipped: weights kept)."""
    seen = []
    monkeypatch.setattr(methods.gptq, "gptq_quantize", lambda W, H, *a, **k: (seen.append(H.clone()) or W, {"damp": 0}))
    methods.get("gptq")(copy.deepcopy(model), QuantSpec.parse("w4a16g64"), calib, {"batch_size": 4})
    return seen


def test_cgq_hessian_is_gptqs_with_unit_weights_and_the_weighted_sum_otherwise(monkeypatch):
    model = random_model("tiny-llada").eval()
    calib = calib_set()
    calib.confidence = confidences(model, calib, 4)
    plain = gptq_hessians(monkeypatch, model, calib)
    ones = gptq_hessians(monkeypatch, model, replace(calib, token_weights=torch.ones(6, 16)))
    for a, b in zip(plain, ones):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    w = token_weights(calib)
    assert w.std() > 0.1  # the weights are not all equal
    weighted = gptq_hessians(monkeypatch, model, replace(calib, token_weights=w))
    # block 0's q/k/v read attn_norm(embed(ids)) whatever was quantized: H = 2/n sum_t w_t x_t x_t^T
    with torch.no_grad():
        x = model.blocks[0].attn_norm(model.embed(calib.input_ids)).reshape(-1, 128)
    direct = 2 / x.shape[0] * (x * w.reshape(-1, 1)).T @ x
    assert torch.allclose(weighted[0], direct, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(weighted[0], plain[0], rtol=1e-2)


def test_cgq_weights_reach_awqs_searches(monkeypatch):
    model = random_model("tiny-llada").eval()
    calib = calib_set()
    calib.confidence = confidences(model, calib, 4)
    w = token_weights(calib)
    calls = captured(monkeypatch, methods.awq, "search_scale")
    methods.get("awq")(copy.deepcopy(model), QuantSpec.parse("w4a16g64"), replace(calib, token_weights=w),
                       {"batch_size": 4, "n_grid": 2, "clip": False})
    first_subset_weights = calls[0][0][-1]  # block 0, attn_norm -> q/k/v: every token (96 < max_tokens)
    assert torch.allclose(first_subset_weights, w.reshape(-1))


# --- IA-AQ ---------------------------------------------------------------------------------------

def test_iaaq_grid():
    grid = IAAQOptions().grid()
    assert len(grid) == 21 and grid[0] == pytest.approx(0.8) and grid[-1] == 1.0
    assert torch.allclose(grid.diff(), torch.full((20,), 0.01), atol=1e-6)
    with pytest.raises(ValueError, match="alpha_min"):
        IAAQOptions(alpha_min=1.1)


def test_head_losses_match_a_direct_sum():
    v = torch.randn(2, 2, 5, 8, generator=GEN)  # [B, H_kv, L, hd]
    attn = torch.rand(2, 4, 5, 5, generator=GEN).softmax(-1)  # 4 query heads: 2 per KV head
    w = torch.tensor([[1.0, 1, 1, 0, 1], [1, 1, 1, 1, 1]])
    alphas = torch.tensor([0.8, 0.9, 1.0])
    got = head_losses(v, attn, 3, alphas, w)
    for i, a in enumerate(alphas.tolist()):
        err = fake_quant(v, 3, False, None, a) - v
        for h in range(2):
            direct = sum(w[b, l] * ((attn[b, q, l] @ err[b, h]) ** 2).sum()
                         for b in range(2) for q in (2 * h, 2 * h + 1) for l in range(5))
            assert got[i, h] == pytest.approx(float(direct), rel=1e-5)


def test_iaaq_search_matches_the_blocks_attention_and_never_loses_to_alpha_one():
    model = random_model("tiny-dream").eval()  # GQA: 4 query heads over 2 KV heads
    calib = calib_set(pad=False)
    fp = copy.deepcopy(model)
    out = calibrate(model, calib, QuantSpec.parse("w4a16kv3"), batch_size=4)
    grid = IAAQOptions().grid()
    for alphas, losses in zip(out["alphas"], out["losses"]):
        assert (losses.min(0).values <= losses[-1]).all()  # alpha = 1 is the grid's last point
        assert torch.equal(alphas, grid[losses.argmin(0)])
    assert any((a < 1).any() for a in out["alphas"]), out["alphas"]
    # block 0 by hand: A = softmax(q k^T / sqrt(hd)) from RoPE'd q/k of attn_norm(embed(ids))
    blk = fp.blocks[0]
    with torch.no_grad():
        h = blk.attn_norm(fp.embed(calib.input_ids))
        cos, sin, _ = fp.block_context(calib.input_ids)
        b, n, hd = h.shape[0], h.shape[1], blk.head_dim
        q = apply_rope(blk.q_proj(h).view(b, n, 4, hd).transpose(1, 2), cos, sin)
        k = apply_rope(blk.k_proj(h).view(b, n, 2, hd).transpose(1, 2), cos, sin).repeat_interleave(2, 1)
        v = blk.v_proj(h).view(b, n, 2, hd).transpose(1, 2)
        attn = (q @ k.transpose(-1, -2) / hd**0.5).softmax(-1)
    assert torch.allclose(out["losses"][0], head_losses(v, attn, 3, grid), rtol=1e-4)
    vq = model.blocks[0].v_quant
    assert isinstance(vq, ActQuantizer) and vq.head_range is not None  # the KV quantizer, with IA-AQ's alphas
    for head in range(2):  # the installed quantizer, scored on the hand-made A: never worse than alpha = 1
        alpha = float(vq.head_range[head])
        assert torch.allclose(vq(v)[:, head], fake_quant(v[:, head], 3, False, None, alpha))
        chosen, at_one = head_losses(v, attn, 3, torch.tensor([alpha, 1.0]))[:, head]
        assert chosen <= at_one


# --- the method ----------------------------------------------------------------------------------

def test_option_errors():
    with pytest.raises(ValueError, match=r"unknown method keys \['tmass'\]"):
        methods.build_options("dllmquant", {"tmass": True})
    with pytest.raises(ValueError, match="base must be one of"):
        methods.build_options("dllmquant", {"base": "rtn"})
    with pytest.raises(ValueError, match="method.cgq must be true or false"):
        methods.build_options("dllmquant", {"cgq": "yes"})
    with pytest.raises(ValueError, match=r"method.tmas_opts.*valid keys.*n_samples"):
        methods.build_options("dllmquant", {"tmas_opts": {"samples": 3}})
    with pytest.raises(ValueError, match="sampling"):
        methods.build_options("dllmquant", {"tmas_opts": {"sampling": "all"}})


def test_iaaq_only_where_v_is_quantized(caplog):
    model = random_model("tiny-llada").eval()
    cfg = {"base": "awq", "tmas": False, "cgq": True, "batch_size": 4, "base_opts": {"n_grid": 2, "clip": False}}
    with caplog.at_level(logging.INFO, logger="qdlm_bench.methods.dllmquant"):
        info = methods.get("dllmquant")(model, QuantSpec.parse("w4a16g64"), calib_set(), cfg)
    assert "IA-AQ skipped" in caplog.text and "iaaq_mean_alpha" not in info
    assert all(isinstance(b.v_quant, torch.nn.Identity) for b in model.blocks)
    info = methods.get("dllmquant")(random_model("tiny-llada").eval(), QuantSpec.parse("w4a8kv4"), calib_set(), cfg)
    assert 0.8 <= info["iaaq_mean_alpha"] <= 1.0


FAST = ["tasks=[mini_qa]", "eval.limit=3", "eval.mc_num=2", "method=dllmquant", "calib=tmas",
        "calib.n_samples=3", "calib.seqlen=32", "method.batch_size=4", "method.tmas_opts.n_samples=8",
        "method.tmas_opts.generation={gen_length: 8, steps: 8, block_length: 8}", "bits=w4a16g64kv4"]


def config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=[*FAST, *overrides]), resolve=True)


@pytest.mark.parametrize("model", ["tiny_random_llada", "tiny_random_dream"])
@pytest.mark.parametrize("base", ["gptq", "awq", "quarot"])
def test_end_to_end(model, base, tmp_path):
    fast = "method.base_opts={n_grid: 2, clip: false}" if base == "awq" else "method.base_opts=null"
    cfg = config(f"model={model}", f"method.base={base}", fast)
    record = pipeline.run(cfg, store_root=tmp_path)
    assert record["status"] == "done", record["error"]
    assert record["spec"]["method"]["base"] == base and 0 <= record["metrics"]["mini_qa"]["value"] <= 1


def test_ablation_experiment_composes_the_ladder():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=dllmquant_ablation"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        assert params["method.base"] == "gptq,awq" and params["bits"] == "w4a16g128,w4a4kv4"
        rungs = params["+dllmquant_ladder"].split(",")
        switches = {}
        for rung in rungs:
            c = compose("config", overrides=["+experiment=dllmquant_ablation", f"+dllmquant_ladder={rung}"])
            plain = OmegaConf.to_container(c, resolve=True)
            spec = runspec.build(plain)  # every rung is a valid run
            m = spec.method
            switches[rung] = (m["tmas"], m["cgq"], m["iaaq"], m["tmas_opts"]["sampling"])
            assert spec.calib.prompt_tasks == ["mini_math", "mini_code"] and plain["sweep"] == "dllmquant_ablation"
    assert switches == {
        "base": (False, False, False, "quota"), "tmas": (True, False, False, "quota"),
        "tmas_cgq": (True, True, False, "quota"), "tmas_cgq_iaaq": (True, True, True, "quota"),
        "uniform": (True, True, True, "uniform"), "text": (True, True, True, "text")}
