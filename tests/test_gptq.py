"""GPTQ solver, Hessian accumulation, the block walk and the gptq method on tiny LLaDA / Dream.

GPTQ only beats RTN where inputs are correlated (i.i.d. Gaussian inputs give a ratio ~1), so
the layer tests use a low-rank signal plus noise, and score on held-out inputs.
"""

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch

from qdlm_bench import methods
from qdlm_bench.faults import NumericalFault
from qdlm_bench.models.presets import random_model
from qdlm_bench.quant import QuantSpec, fake_quant, linear_layers, quantized_layer_names
from qdlm_bench.methods.gptq import Hessian, gptq_quantize
from qdlm_bench.quant.walk import SUBSETS, walk_blocks

GEN = torch.Generator().manual_seed(0)
MIX = torch.randn(32, 256, generator=GEN)  # 32-dim signal embedded in 256 input dims
W = torch.randn(128, 256, generator=GEN) * 0.05


def correlated(n: int) -> torch.Tensor:
    return torch.randn(n, 32, generator=GEN) @ MIX + 0.1 * torch.randn(n, 256, generator=GEN)


X_CAL, X_TEST = correlated(2048), correlated(2048)


def hessian(x: torch.Tensor) -> torch.Tensor:
    h = Hessian(x.shape[-1])
    h.add(x)
    return h.H


def held_out_error(Q: torch.Tensor) -> float:
    return ((X_TEST @ (Q - W).T) ** 2).mean().item()


def max_values_per_group(Q: torch.Tensor, group_size: int) -> int:
    return max(len(torch.unique(g)) for g in Q.unflatten(-1, (-1, group_size)).flatten(0, 1))


# --- the solver on one layer --------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("order", [{}, dict(act_order=True, static_groups=True)])
def test_gptq_beats_rtn_on_held_out_correlated_inputs(bits, order):
    Q, info = gptq_quantize(W, hessian(X_CAL), bits, sym=False, group_size=128, **order)
    ratio = held_out_error(Q) / held_out_error(fake_quant(W, bits, False, 128))
    assert ratio < 0.5, ratio  # measured ~0.04-0.07
    assert info["damp"] == 0.01 and Q.dtype == W.dtype and Q.shape == W.shape
    # the grid is the RTN grid of its group (original column order): at most 2^bits values
    assert max_values_per_group(Q, 128) <= 2**bits


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_per_channel_and_short_last_group(sym):
    H = hessian(X_CAL)
    Q, _ = gptq_quantize(W, H, 3, sym)  # one grid per output row
    assert max(len(torch.unique(r)) for r in Q) <= 8
    Q, _ = gptq_quantize(W, H, 3, sym, group_size=96)  # groups 96, 96, 64
    for lo, hi in [(0, 96), (96, 192), (192, 256)]:
        assert max(len(torch.unique(r)) for r in Q[:, lo:hi]) <= 8
    assert held_out_error(Q) < held_out_error(fake_quant(W, 3, sym, 96))


def test_gptq_in_bf16_returns_bf16():
    Q, _ = gptq_quantize(W.bfloat16(), hessian(X_CAL), 4, False, 128)
    assert Q.dtype == torch.bfloat16 and torch.isfinite(Q.float()).all()


@pytest.mark.parametrize("order", [{}, dict(act_order=True)])
def test_stacked_rows_equal_separate_solves(order):
    """The method quantizes the linears that share a Hessian (q/k/v, gate/up) as one stacked matrix."""
    H, W2 = hessian(X_CAL), torch.randn(64, 256, generator=GEN) * 0.05
    (Qa, a), (Qb, b) = (gptq_quantize(w, H, 3, False, 128, **order) for w in (W, W2))
    Q, info = gptq_quantize(torch.cat([W, W2]), H, 3, False, 128, **order)
    torch.testing.assert_close(Q, torch.cat([Qa, Qb]), rtol=0, atol=1e-6)
    assert info["loss"] == pytest.approx(a["loss"] + b["loss"], rel=1e-5)


# --- Hessian ------------------------------------------------------------------------------------

def test_hessian_weights():
    x = torch.randn(3, 10, 16)
    plain, ones, weighted = Hessian(16), Hessian(16), Hessian(16)
    w = torch.rand(3, 10)
    for b in range(3):  # accumulated over batches like the walk does
        plain.add(x[b])
        ones.add(x[b], torch.ones(10))
        weighted.add(x[b], w[b])
    flat, wf = x.reshape(-1, 16), w.reshape(-1)
    assert torch.allclose(plain.H, ones.H) and plain.n == 30
    assert torch.allclose(plain.H, 2 / 30 * flat.T @ flat, atol=1e-5)
    assert torch.allclose(weighted.H, 2 / 30 * (flat * wf[:, None]).T @ flat, atol=1e-5)
    assert not torch.allclose(weighted.H, plain.H)


def test_singular_hessian_raises_damp_with_warning():
    x = torch.randn(512, 32, generator=GEN) @ MIX  # rank 32 of 256: no noise
    x[:, 7] = 0  # and a dead column
    with pytest.warns(UserWarning, match="Cholesky failed"):
        Q, info = gptq_quantize(W, hessian(x), 4, False, 128, damp=1e-9, name="blocks.0.q_proj")
    assert info["damp"] > 1e-9 and info["dead"] == 1
    assert torch.isfinite(Q).all() and torch.all(Q[:, 7] == 0)


def test_hessian_never_positive_definite_is_a_numerical_fault_naming_the_layer():
    H = -torch.eye(256)  # negative definite: no dampening of at most max_damp * mean(diag) = -1 helps
    with pytest.warns(UserWarning, match="Cholesky failed") as caught:
        with pytest.raises(NumericalFault) as err:
            gptq_quantize(W, H, 4, False, 128, damp=0.01, max_damp=1.0, name="blocks.2.gate_proj+up_proj")
    assert (err.value.kind, err.value.layer) == ("hessian_not_pd", "blocks.2.gate_proj+up_proj")
    assert "damp=1 " in str(err.value) and len(caught) == 2  # 0.01 -> 0.1 -> 1, then the fault


def test_non_finite_hessian_is_a_numerical_fault_without_retries():
    x = correlated(64)
    x[3, 10] = float("nan")  # one NaN calibration activation
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no damp retries
        with pytest.raises(NumericalFault, match="hessian not pd at blocks.0.q_proj: the Hessian holds 511 NaN") as err:
            gptq_quantize(W, hessian(x), 4, False, 128, name="blocks.0.q_proj")
    assert err.value.kind == "hessian_not_pd"


# --- the block walk -----------------------------------------------------------------------------

def test_walk_collects_inputs_of_the_already_quantized_model():
    """True-sequential: each subset's statistic is taken after the earlier subsets (and blocks)
    are quantized, so it must equal the input Hessian of that linear in the FINAL model."""
    model = random_model("tiny-llada").eval()
    calib = SimpleNamespace(input_ids=torch.randint(0, 128, (6, 16), generator=GEN))
    seen = {}

    def fn(i, block, stats):
        for name, h in stats.items():
            seen[f"blocks.{i}.{name}"] = h.H.clone()
            getattr(block, name).weight.copy_(fake_quant(getattr(block, name).weight, 2, False, 64))

    walk_blocks(model, calib, fn, lambda m: Hessian(m.in_features), batch_size=4, progress=False)
    assert set(seen) == set(linear_layers(model))
    final = {n: Hessian(m.in_features) for n, m in linear_layers(model).items()}
    hooks = [m.register_forward_hook(lambda m, a, o, h=final[n]: h.add(a[0])) for n, m in linear_layers(model).items()]
    with torch.no_grad():
        model(calib.input_ids)
    for h in hooks:
        h.remove()
    for name in seen:
        assert torch.allclose(seen[name], final[name].H, rtol=1e-4, atol=1e-5), name
    assert [n for s in SUBSETS for n in s] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- the method on tiny LLaDA and Dream ---------------------------------------------------------

@pytest.mark.parametrize("shape", ["tiny-llada", "tiny-dream"])
@pytest.mark.parametrize("cfg", [{}, dict(act_order=True, static_groups=True, true_sequential=False)])
def test_gptq_method_on_tiny_models(shape, cfg):
    fp = random_model(shape).eval()
    calib = SimpleNamespace(input_ids=torch.randint(0, 128, (16, 64), generator=GEN))
    held = torch.randint(0, 128, (8, 64), generator=GEN)
    with torch.no_grad():
        ref = fp(held)
    errs, models = {}, {}
    for method, bits in [("rtn", "w2a16g64"), ("rtn", "w3a16g128"), ("gptq", "w3a16g128")]:
        model = models[method, bits] = copy.deepcopy(fp)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no damp raise on healthy Hessians
            info = methods.get(method)(model, QuantSpec.parse(bits), calib, {**cfg, "batch_size": 4} if method == "gptq" else {})
        with torch.no_grad():
            errs[method, bits] = ((model(held) - ref) ** 2).mean().item()
    model = models["gptq", "w3a16g128"]
    names = [f"blocks.{i}.{n}" for i in range(len(model.blocks)) for s in SUBSETS for n in s]
    assert sorted(quantized_layer_names(model)) == sorted(names) and info["layers"] == len(names)
    fp_params, q_params = dict(fp.named_parameters()), dict(model.named_parameters())
    for name in names:  # every weight changed, onto a 3-bit grid; biases untouched
        q = q_params[f"{name}.weight"]
        assert not torch.equal(q, fp_params[f"{name}.weight"]), name
        assert max_values_per_group(q, 128) <= 8
        if f"{name}.bias" in fp_params:
            assert torch.equal(q_params[f"{name}.bias"], fp_params[f"{name}.bias"])
    for name in ("embed.weight", "lm_head.weight", "norm.weight"):
        assert torch.equal(q_params[name], fp_params[name])
    gptq, rtn3, rtn2 = errs["gptq", "w3a16g128"], errs["rtn", "w3a16g128"], errs["rtn", "w2a16g64"]
    assert torch.isfinite(torch.tensor(gptq)) and gptq < 0.9 * rtn3 < rtn2, errs  # measured ~0.7 x RTN


def test_exclude_and_registry():
    model = random_model("tiny-llada").eval()
    fp = copy.deepcopy(model)
    calib = SimpleNamespace(input_ids=torch.randint(0, 128, (4, 16), generator=GEN))
    info = methods.get("gptq")(model, QuantSpec.parse("w4a16", exclude=["*.down_proj"]), calib)
    assert info["layers"] == 12 and torch.equal(model.blocks[0].down_proj.weight, fp.blocks[0].down_proj.weight)
    assert methods.needs_calibration("gptq") and not methods.needs_calibration("rtn")
    assert not methods.needs_calibration("fp")
    with pytest.raises(ValueError, match="calibration"):
        methods.get("gptq")(model, QuantSpec.parse("w4a16"), None, {})
