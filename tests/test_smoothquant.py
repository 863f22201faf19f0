"""Smoothing primitives and the smoothquant method on tiny LLaDA / Dream layouts."""

import copy
from types import SimpleNamespace

import pytest
import torch

from qdlm_bench import methods
from qdlm_bench.models.presets import random_model
from qdlm_bench.quant import ChannelMax, QuantSpec, quantized_layer_names
from qdlm_bench.quant.smooth import smooth_block, smooth_scales
from qdlm_bench.quant.walk import walk_blocks



CALIB = SimpleNamespace(input_ids=torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0)))


def with_outliers(shape: str, scale: float = 40.0):
    """A tiny random model whose norms give a few input channels of q/k/v and gate/up a large scale."""
    model = random_model(shape).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn_norm.weight[[3, 50, 90]] = scale
            b.mlp_norm.weight[[7, 100]] = scale
    return model


def logits_error(model, method: str, bits: str, **cfg) -> float:
    q = copy.deepcopy(model)
    methods.get(method)(q, QuantSpec.parse(bits), CALIB, cfg)
    with torch.no_grad():
        ref, out = model(CALIB.input_ids), q(CALIB.input_ids)
    return ((out - ref).norm() / ref.norm()).item()


def test_smooth_scales_formula():
    x_max = torch.tensor([4.0, 1.0, 0.0])
    w1, w2 = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[-0.25, 1.0, 2.0]])
    s = smooth_scales(x_max, [w1, w2], 0.5)  # max|W| per column over both linears: [1, 2, 2]
    assert torch.allclose(s, torch.tensor([2.0, 0.5 ** 0.5, 1e-5 ** 0.5 / 2 ** 0.5]))
    assert torch.allclose(smooth_scales(x_max, [w1], 1.0), x_max.clamp(min=1e-5))
    assert torch.allclose(smooth_scales(x_max, [w1], 0.0), 1 / w1.abs()[0])
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(x_max, [w1], 1.5)


def test_channel_max_ignores_padding():
    st = ChannelMax(3)
    st.add(torch.tensor([[[1.0, -5.0, 2.0], [100.0, 100.0, 100.0]]]), torch.tensor([[1.0, 0.0]]))
    st.add(torch.tensor([[-3.0, 1.0, 0.0]]))
    assert torch.equal(st.max, torch.tensor([3.0, 5.0, 2.0]))


@pytest.mark.parametrize("shape", ["tiny-llada", "tiny-dream"])
def test_smoothing_leaves_fp_logits_unchanged(shape):
    model = with_outliers(shape)
    with torch.no_grad():
        ref = model(CALIB.input_ids)
    fp = copy.deepcopy(model)
    smoothed = {}

    def fn(i, block, stats):
        smoothed[i] = smooth_block(block, {n: st.max for n, st in stats.items()}, 0.5, lambda n: True)

    walk_blocks(model, CALIB, fn, lambda m: ChannelMax(m.in_features), batch_size=2, true_sequential=False,
                progress=False)
    gqa = model.config.n_kv_heads != model.config.n_heads
    expected = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"} | (set() if gqa else {"o_proj"})
    assert all(set(s) == expected for s in smoothed.values())
    b, b0 = model.blocks[0], fp.blocks[0]
    assert b.attn_norm.weight[3] < b0.attn_norm.weight[3] / 3  # the outlier channel really moved
    assert not torch.equal(b.q_proj.weight, b0.q_proj.weight)
    with torch.no_grad():
        out = model(CALIB.input_ids)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("shape", ["tiny-llada", "tiny-dream"])
def test_smoothquant_w8a8_error_below_rtn_with_outlier_channels(shape):
    model = with_outliers(shape)
    rtn, smooth = logits_error(model, "rtn", "w8a8"), logits_error(model, "smoothquant", "w8a8")
    assert smooth < 0.7 * rtn, (smooth, rtn)


def test_smoothquant_quantizes_every_linear_and_respects_act_layers():
    model = with_outliers("tiny-dream")
    info = methods.get("smoothquant")(model, QuantSpec.parse("w8a8"), CALIB, {})
    assert info == {"layers": 14, "smoothed": 12}  # o_proj is not smoothed under GQA
    assert len(quantized_layer_names(model)) == 14
    assert all(len(torch.unique(row)) <= 256 for row in model.blocks[1].q_proj.weight)
    model = with_outliers("tiny-llada")
    norm = model.blocks[0].attn_norm.weight.clone()
    info = methods.get("smoothquant")(model, QuantSpec.parse("w8a8", act_layers=["down_proj"]), CALIB, {})
    assert info == {"layers": 14, "smoothed": 2}  # only down_proj's input is quantized, only it is smoothed
    assert torch.equal(model.blocks[0].attn_norm.weight, norm)


def test_smoothquant_at_weight_only_bits_smooths_and_keeps_activations_fp():
    model = with_outliers("tiny-llada")
    fp = copy.deepcopy(model)
    info = methods.get("smoothquant")(model, QuantSpec.parse("w8a16"), CALIB, {})
    assert info == {"layers": 14, "smoothed": 14}
    assert all(model.get_submodule(n).act_quant.bits == 16 for n in quantized_layer_names(model))
    assert not torch.equal(model.blocks[0].attn_norm.weight, fp.blocks[0].attn_norm.weight)  # scales folded
