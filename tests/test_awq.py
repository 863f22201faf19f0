"""AWQ primitives (scale search, folding, clip search) and the awq method on tiny LLaDA / Dream."""

import copy
from types import SimpleNamespace

import pytest
import torch

from qdlm_bench import methods
from qdlm_bench.methods.awq import scale_block
from qdlm_bench.models.presets import random_model
from qdlm_bench.methods.awq import quantize_clipped, search_clip, search_scale
from qdlm_bench.quant import QuantSpec, TokenStats, fake_quant, fold_scales, linear_layers, quantized_layer_names
from qdlm_bench.quant.walk import SUBSETS, Batches, block_inputs, collect, run_block, walk_blocks

GEN = torch.Generator().manual_seed(0)


def outlier_inputs(n: int, d: int = 256, outliers: bool = True) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    if outliers:
        x[:, [3, 70, 140, 200]] *= 30.0  # a few large-magnitude channels, as in LLM activations
    return x


def subset_error(Ws, Qs, x):
    return sum(((x @ (q - w).T) ** 2).sum(-1).mean().item() for w, q in zip(Ws, Qs))


def tiny(shape):
    model = random_model(shape).float().eval()
    calib = SimpleNamespace(input_ids=torch.randint(0, 128, (8, 32), generator=GEN))
    return model, calib


def stats_of(model, calib, i=0):
    batches = Batches(model, calib, 4, None)
    xs = block_inputs(model, calib.input_ids, 4)
    block = model.blocks[i]
    return block, xs, batches, collect(block, xs, batches, SUBSETS, lambda m: TokenStats(m.in_features, xs.shape[0] * xs.shape[1]))


# --- folding leaves the FP function unchanged ---------------------------------------------------

@pytest.mark.parametrize("shape", ["tiny-llada", "tiny-dream"])
def test_folding_scales_keeps_block_output_and_logits(shape):
    model, calib = tiny(shape)
    with torch.no_grad():
        ref = model(calib.input_ids)
    block, xs, batches, stats = stats_of(model, calib)
    before = run_block(block, xs, batches)
    alphas = scale_block(block, stats, QuantSpec.parse("w3a16g64"), lambda n: True, n_grid=8)
    gqa = model.config.n_kv_heads != model.config.n_heads
    assert set(alphas) == ({"attn_norm", "mlp_norm", "up_proj"} | (set() if gqa else {"v_proj"}))
    assert any(a > 0 for a in alphas.values()), alphas  # the fold is not the identity
    assert not torch.equal(block.q_proj.weight, random_model(shape).float().blocks[0].q_proj.weight)
    assert torch.allclose(run_block(block, xs, batches), before, rtol=1e-4, atol=1e-5)

    def fn(i, blk, st):  # fold every block of the model, no quantization
        if i > 0:
            scale_block(blk, st, QuantSpec.parse("w3a16g64"), lambda n: True, n_grid=8)

    walk_blocks(model, calib, fn, lambda m: TokenStats(m.in_features, calib.input_ids.numel()),
                batch_size=4, true_sequential=False, progress=False)
    with torch.no_grad():
        assert torch.allclose(model(calib.input_ids), ref, rtol=1e-4, atol=1e-4)


def test_fold_into_linear_feeder_scales_its_bias():
    v, o = torch.nn.Linear(8, 8, bias=True), torch.nn.Linear(8, 5)
    x, s = torch.randn(10, 8), torch.rand(8) + 0.5
    ref = o(v(x))
    with torch.no_grad():
        fold_scales(v, [o], s)
    assert torch.allclose(o(v(x)), ref, atol=1e-5)


# --- scale search -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("outliers", [True, False])
def test_awq_subset_error_at_most_rtn(bits, outliers):
    Ws = [torch.randn(128, 256, generator=GEN) * 0.05 for _ in range(2)]
    x_cal, x_test = outlier_inputs(1024, outliers=outliers), outlier_inputs(2048, outliers=outliers)
    s, info = search_scale(Ws, x_cal, x_cal.abs().mean(0), bits, False, 128)
    Qs = [fake_quant(w * s, bits, False, 128) / s for w in Ws]  # Q(W s) (x / s) == (Q(W s) / s) x
    rtn = [fake_quant(w, bits, False, 128) for w in Ws]
    ratio = subset_error(Ws, Qs, x_test) / subset_error(Ws, rtn, x_test)
    # (c): never worse than alpha = 0 on its own loss, and alpha = 0 is exactly RTN
    assert info["loss"] == min(info["losses"]) <= info["losses"][0]
    assert info["losses"][0] == pytest.approx(subset_error(Ws, rtn, x_cal), rel=1e-4)
    if outliers:
        assert info["alpha"] > 0 and ratio < 0.7, (info["alpha"], ratio)  # measured ~0.2-0.3
    else:
        assert info["loss"] <= info["losses"][0] and ratio < 1.05, ratio


# --- clip search --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size", [(3, 128), (4, 64), (3, None)])
def test_clip_never_increases_its_loss(bits, group_size):
    W = torch.randn(96, 256, generator=GEN) * 0.05
    W[:, 5] *= 8  # an outlier weight per row: clipping pays off
    x = outlier_inputs(700, outliers=False)
    ratios, info = search_clip(W, x, bits, False, group_size, oc_batch=40)
    assert info["loss"] <= info["loss_noclip"] and (ratios < 1).any() and (ratios >= 0.5 - 1e-6).all()
    # recompute both per-group losses independently: output error per (row, group), summed
    gs = group_size or 256
    xs = x[::2]  # search_clip strides to <= 512 tokens

    def loss(Q):
        d = (Q - W).unflatten(-1, (-1, gs))
        return (torch.einsum("ogk,tgk->otg", d, xs.unflatten(-1, (-1, gs))) ** 2).mean(1).sum().item()

    clipped, plain = loss(quantize_clipped(W, bits, False, group_size, ratios)), loss(fake_quant(W, bits, False, group_size))
    assert clipped == pytest.approx(info["loss"], rel=1e-3) and plain == pytest.approx(info["loss_noclip"], rel=1e-3)
    assert clipped < plain


# --- the method on tiny models ------------------------------------------------------------------

def max_values_per_group(Q, group_size):
    return max(len(torch.unique(g)) for g in Q.unflatten(-1, (-1, group_size)).flatten(0, 1))


@pytest.mark.parametrize("shape", ["tiny-llada", "tiny-dream"])
def test_awq_method_on_tiny_models(shape):
    fp = random_model(shape).eval()
    calib = SimpleNamespace(input_ids=torch.randint(0, 128, (16, 64), generator=GEN))
    held = torch.randint(0, 128, (8, 64), generator=GEN)
    errs = {}
    with torch.no_grad():
        ref = fp(held)
    for method in ("rtn", "awq"):
        model = copy.deepcopy(fp)
        info = methods.get(method)(model, QuantSpec.parse("w3a16g64"), calib,
                                   {"batch_size": 4, "max_tokens": 512} if method == "awq" else {})
        with torch.no_grad():
            errs[method] = ((model(held) - ref) ** 2).mean().item()
    names = [f"blocks.{i}.{n}" for i in range(len(model.blocks)) for s in SUBSETS for n in s]
    assert sorted(quantized_layer_names(model)) == sorted(names) and info["layers"] == 14
    fp_params, q_params = dict(fp.named_parameters()), dict(model.named_parameters())
    for name in names:  # stored W' = Q(W s): at most 2^bits values per group of every row
        assert not torch.equal(q_params[f"{name}.weight"], fp_params[f"{name}.weight"]), name
        assert max_values_per_group(q_params[f"{name}.weight"], 64) <= 8, name
    for name in ("embed.weight", "lm_head.weight", "norm.weight"):
        assert torch.equal(q_params[name], fp_params[name])
    assert errs["awq"] < errs["rtn"], errs


def test_registry_and_exclude():
    model, calib = tiny("tiny-llada")
    fp = copy.deepcopy(model)
    info = methods.get("awq")(model, QuantSpec.parse("w4a16", exclude=["*.down_proj"]), calib, {"n_grid": 5, "clip": False})
    assert info["layers"] == 12 and methods.needs_calibration("awq")
    assert len(linear_layers(model)) == 14
    # a subset with nothing to quantize is neither scaled nor quantized
    assert torch.equal(model.blocks[0].down_proj.weight, fp.blocks[0].down_proj.weight)
    with pytest.raises(ValueError, match="calibration"):
        methods.get("awq")(model, QuantSpec.parse("w4a16"), None, {})


def test_token_stats_subsample_is_deterministic_and_bounded():
    st = TokenStats(4, total_tokens=100, max_tokens=30)
    x = torch.arange(400.).view(100, 4)
    for chunk in x.split(7):
        st.add(chunk)
    assert len(st.x) <= 30 and torch.equal(st.x, x[::4]) and torch.allclose(st.x_mean, x.abs().mean(0))
    # memory holds the sample only, not every batch it was drawn from
    assert sum(t.untyped_storage().nbytes() for t in st.xs) == st.x.numel() * 4
