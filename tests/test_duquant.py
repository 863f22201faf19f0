"""DuQuant primitives (greedy rotations, zigzag permutation, online transform) and the method."""

import copy

import pytest
import torch
from test_smoothquant import CALIB, with_outliers

from qdlm_bench import methods
from qdlm_bench.methods.duquant import transform_block
from qdlm_bench.quant import QuantSpec, fake_quant, quantized_layer_names
from qdlm_bench.methods.duquant import (OutlierStats, fit_transform, greedy_rotation, spreading_rotation,
                                        zigzag_permutation)
from qdlm_bench.quant.smooth import smooth_scales
from qdlm_bench.quant.walk import walk_blocks

FAST = dict(steps=24, max_tokens=128)


def outlier_tokens(n: int, d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    x[:, [3, d // 3, d // 2, d - 5]] *= 30.0  # outlier channels
    x[5, 17] = 500.0  # a massive outlier on one token
    return x


def dense(blocks: torch.Tensor, d: int) -> torch.Tensor:
    return torch.block_diag(*blocks)[:d, :d]


def test_spreading_rotation_is_orthogonal_with_a_uniform_first_row():
    R = spreading_rotation(16, torch.Generator().manual_seed(0))
    assert torch.allclose(R @ R.T, torch.eye(16), atol=1e-5)
    assert torch.allclose(R[0], torch.full((16,), 0.25), atol=1e-6)


@pytest.mark.parametrize("d", [128, 200, 256, 40])
def test_rotations_are_orthogonal_and_the_permutation_is_a_permutation(d):
    x = outlier_tokens(256, d)
    T = fit_transform(x, 128, 32, torch.Generator().manual_seed(0))
    b = min(128, d)
    assert T.r1.shape == T.r2.shape == (-(-d // b), b, b)
    for blocks in (T.r1, T.r2):
        R = dense(blocks, d)
        assert torch.allclose(R @ R.T, torch.eye(d), atol=1e-5)
        if d % b:  # the shorter last block acts on its own channels only
            tail = blocks[-1]
            assert torch.equal(tail[d % b:, d % b:], torch.eye(b - d % b)) and not tail[:d % b, d % b:].any()
    assert torch.equal(T.perm.sort().values, torch.arange(d))
    M = T(torch.eye(d))  # the whole transform, x -> x M
    assert torch.allclose(M @ M.T, torch.eye(d), atol=1e-5)
    assert torch.allclose(M, dense(T.r1, d)[:, T.perm] @ dense(T.r2, d), atol=1e-6)


def test_greedy_rotation_spreads_the_outliers_of_each_block():
    x = outlier_tokens(256, 256).unflatten(-1, (2, 128))
    R = greedy_rotation(x, 32, torch.Generator().manual_seed(0))
    before, after = x.abs().amax((0, 2)), torch.einsum("tnb,nbc->tnc", x, R).abs().amax((0, 2))
    assert torch.all(after < 0.25 * before), (before, after)
    assert torch.equal(greedy_rotation(x, 0), torch.eye(128).repeat(2, 1, 1))


def test_zigzag_deals_channels_to_blocks_in_zigzag_order():
    # channels by decreasing size: 7, 6, ..., 0
    assert zigzag_permutation(torch.arange(8.0), 2).tolist() == [7, 0, 6, 1, 5, 2, 4, 3]
    # blocks of sizes 2, 2, 1: zigzag 0 1 2 2 1 0, the short block is skipped once full
    assert zigzag_permutation(torch.arange(5.0), 2).tolist() == [4, 0, 3, 1, 2]


def test_outlier_stats_keep_peak_tokens_and_skip_padding():
    st = OutlierStats(4, total_tokens=64, max_tokens=8, n_peak=2)
    x = torch.randn(2, 32, 4, generator=torch.Generator().manual_seed(0))
    x[0, 9, 1], x[1, 30, 2] = 50.0, -70.0  # peak tokens off the stride-8 sample
    x[1, 0] = 1e4  # padding: never seen
    w = torch.ones(2, 32)
    w[1, 0] = 0
    st.add(x, w)
    assert torch.equal(st.peaks, torch.stack([x[1, 30], x[0, 9]]))
    assert st.max[1] == 50 and st.max[2] == 70 and (st.x.abs() < 1e4).all()
    assert len(st.x) == 8 - 1 + 2  # strided sample without the padding token, plus the peaks


@pytest.mark.parametrize("shape, block_size", [("tiny-llada", 128), ("tiny-dream", 128), ("tiny-dream", 96)])
def test_transform_leaves_fp_logits_unchanged(shape, block_size):
    model = with_outliers(shape)
    with torch.no_grad():
        ref = model(CALIB.input_ids)
    fp_weight = model.blocks[0].down_proj.weight.clone()
    found = {}

    def fn(i, block, stats):
        found[i] = transform_block(block, stats, 0.6, lambda n: True, lambda n: True, block_size, 16,
                                   torch.Generator().manual_seed(0))

    walk_blocks(model, CALIB, fn, lambda m: OutlierStats(m.in_features, CALIB.input_ids.numel(), 128),
                batch_size=2, true_sequential=False, progress=False)
    assert all(len(f) == 7 for f in found.values())
    assert found[0]["q_proj"] is found[0]["v_proj"] and found[0]["q_proj"] is not found[0]["o_proj"]
    assert found[0]["down_proj"].r1.shape[0] == -(-256 // block_size)
    assert not torch.allclose(model.blocks[0].down_proj.weight, fp_weight, atol=1e-3)
    with torch.no_grad():
        out = model(CALIB.input_ids)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_duquant_w4a4_layer_error_far_below_rtn():
    x, W = outlier_tokens(1024, 256), torch.randn(128, 256, generator=torch.Generator().manual_seed(1)) / 16
    cal, test = x[:512], x[512:]
    y = test @ W.T

    def err(x, W, lac=1.0, swc=1.0):
        return ((fake_quant(x, 4, False, None, lac) @ fake_quant(W, 4, True, None, swc).T - y).norm() / y.norm()).item()

    s = smooth_scales(cal.abs().amax(0), [W], 0.6)
    T = fit_transform(cal / s, 128, 64, torch.Generator().manual_seed(0))
    rtn, duq = err(test, W), err(T(test / s), T(W * s), 0.9, 0.8)
    assert duq < 0.4 * rtn, (duq, rtn)
    assert err(T(test / s), T(W * s)) < 0.4 * rtn  # without the clip ratios too


def block_error(model, method: str, bits: str, **cfg) -> float:
    """Relative error of the first block's update of the residual stream after quantizing the model
    (logits of a tiny random model are too chaotic to compare methods at 4 bits)."""
    q = copy.deepcopy(model)
    methods.get(method)(q, QuantSpec.parse(bits), CALIB, cfg)
    ids = CALIB.input_ids
    with torch.no_grad():
        x, ctx = model.embed(ids), model.block_context(ids)
        ref, out = model.blocks[0](x, *ctx) - x, q.blocks[0](x, *ctx) - x
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("shape", ["tiny-llada", "tiny-dream"])
def test_duquant_w4a4_model_error_below_rtn(shape):
    model = with_outliers(shape, scale=80.0)
    rtn, duq = block_error(model, "rtn", "w4a4"), block_error(model, "duquant", "w4a4", **FAST)
    assert duq < 0.7 * rtn, (duq, rtn)


def test_duquant_quantizes_every_linear_behind_its_transform():
    model = with_outliers("tiny-dream")
    info = methods.get("duquant")(model, QuantSpec.parse("w4a4"), CALIB, FAST)
    assert info == {"layers": 14, "transformed": 14}
    assert len(quantized_layer_names(model)) == 14
    for name in ("o_proj", "down_proj"):
        layer = getattr(model.blocks[1], name)
        assert layer.input_transform is not None and layer.act_quant.clip_ratio == 0.9
        assert layer.act_quant.bits == 4 and max(len(torch.unique(r)) for r in layer.weight) <= 16
    model = with_outliers("tiny-llada")
    info = methods.get("duquant")(model, QuantSpec.parse("w4a4", act_layers=["o_proj"]), CALIB, FAST)
    assert info == {"layers": 14, "transformed": 2}
    assert model.blocks[0].q_proj.input_transform is None and model.blocks[0].o_proj.input_transform is not None


def test_duquant_bad_settings():
    model, spec = with_outliers("tiny-llada"), QuantSpec.parse("w4a4", a_clip_ratio=0.8)
    with pytest.raises(ValueError, match="method.lac"):
        methods.get("duquant")(model, spec, CALIB, {})
    with pytest.raises(ValueError, match="swc"):
        methods.get("duquant")(model, QuantSpec.parse("w4a4"), CALIB, {"swc": 0})
    with pytest.raises(ValueError, match="block_size"):
        fit_transform(torch.randn(4, 8), 0)


def test_duquant_at_weight_only_bits_transforms_and_keeps_activations_fp():
    fp = with_outliers("tiny-llada")
    model = copy.deepcopy(fp)
    info = methods.get("duquant")(model, QuantSpec.parse("w4a16"), CALIB, FAST)
    assert info["layers"] == 14 and info["transformed"] == 14
    for name in quantized_layer_names(model):
        layer = model.get_submodule(name)
        assert layer.input_transform is not None and layer.act_quant.bits == 16
    assert block_error(fp, "duquant", "w4a16", **FAST) < block_error(fp, "rtn", "w4a16")


def test_block_rotation_inverse_undoes_it():
    x = outlier_tokens(64, 80)
    T = fit_transform(x, 32, 8)  # 80 = 2 x 32 + a block of 16
    assert torch.allclose(T.inverse(T(x)), x, atol=1e-4) and torch.allclose(T(T.inverse(x)), x, atol=1e-4)


def test_weight_only_transforms_fold_into_the_weights_with_the_same_logits():
    from qdlm_bench.quant import fold_input_transforms

    model = with_outliers("tiny-llada")
    methods.get("duquant")(model, QuantSpec.parse("w4a16"), CALIB, FAST)
    ids = CALIB.input_ids[:2]
    before = model(ids)
    assert fold_input_transforms(model) == 14
    assert all(model.get_submodule(n).input_transform is None for n in quantized_layer_names(model))
    assert torch.allclose(model(ids), before, atol=5e-4)  # float32 rounding at activations up to 500
    quantized = with_outliers("tiny-llada")  # inputs quantized: the transform stays online
    methods.get("duquant")(quantized, QuantSpec.parse("w8a8"), CALIB, FAST)
    assert fold_input_transforms(quantized) == 0
    bf16 = with_outliers("tiny-llada").to(torch.bfloat16)  # a bf16 weight would round the folded product
    methods.get("duquant")(bf16, QuantSpec.parse("w4a16"), CALIB, FAST)
    assert fold_input_transforms(bf16) == 0
