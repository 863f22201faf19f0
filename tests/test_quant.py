"""Quantization primitives, QuantSpec, QuantLinear coverage, RTN and the methods registry."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qdlm_bench import methods
from qdlm_bench.models import LINEAR_NAMES, DiffusionLM, DLLMConfig
from qdlm_bench.quant import (ActQuantizer, QuantLinear, QuantSpec, fake_quant, int_codes, qrange,
                              install_quantizers, quantized_layer_names)


def tiny_model(family: str, tie: bool = False) -> DiffusionLM:
    torch.manual_seed(0)
    extra = dict(n_kv_heads=2, qkv_bias=True, shift_logits=True) if family == "dream" else dict(n_kv_heads=4)
    cfg = DLLMConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                     mask_token_id=63, eos_token_id=62, pad_token_id=62, tie_embeddings=tie, **extra)
    return DiffusionLM(cfg).eval()


def rtn(model, bits: str, **targets):
    return methods.get("rtn")(model, QuantSpec.parse(bits, **targets), None)


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


# --- fake quantizers -------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [128, None])
def test_distinct_values_per_group(bits, sym, group_size):
    w = torch.randn(16, 512)
    q = fake_quant(w, bits, sym, group_size)
    groups = q.unflatten(-1, (-1, group_size or 512)).flatten(0, 1)
    assert max(len(torch.unique(g)) for g in groups) <= 2**bits
    assert not torch.equal(q, w)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_in_range_and_error_bounded(bits, sym):
    w = torch.randn(8, 256) * 3 + (0 if sym else 1)
    codes, scale, zero = int_codes(w, bits, sym, 64)
    lo, hi = qrange(bits, sym)
    assert codes.dtype == torch.int32 and codes.min() >= lo and codes.max() <= hi
    if sym:
        assert (lo, hi) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) and torch.all(zero == 0)
    assert torch.equal(zero, zero.round())
    scale_e = scale.repeat_interleave(64, -1)
    deq = (codes - zero.repeat_interleave(64, -1)) * scale_e
    assert torch.allclose(deq, fake_quant(w, bits, sym, 64))
    assert torch.all((deq - w).abs() <= scale_e / 2 + 1e-5)


@pytest.mark.parametrize("sym", [False, True])
def test_clip_ratio_bounds_error_inside_clip_range(sym):
    x = torch.randn(4, 64)
    _, scale, _ = int_codes(x, 4, sym, clip_ratio=0.7)
    if sym:
        inside = x.abs() <= 0.7 * x.abs().amax(-1, keepdim=True)
    else:
        inside = (x >= 0.7 * x.amin(-1, keepdim=True)) & (x <= 0.7 * x.amax(-1, keepdim=True))
    err = (fake_quant(x, 4, sym, clip_ratio=0.7) - x).abs()
    assert torch.all(err[inside] <= scale.expand_as(x)[inside] / 2 + 1e-5)
    assert err[~inside].max() > scale.max() / 2  # values outside the range really are clipped


@pytest.mark.parametrize("sym", [False, True])
def test_per_token_activation_quant(sym):
    x = torch.randn(2, 6, 48)
    x[0, 2] = 0  # an all-zero token
    aq = ActQuantizer(bits=4, sym=sym)
    y = aq(x)
    assert torch.isfinite(y).all() and torch.equal(y[0, 2], torch.zeros(48))
    assert all(len(torch.unique(row)) <= 16 for row in y.reshape(-1, 48))
    x2 = x.clone()
    x2[1, 3] *= 100  # scale of each row depends only on that row
    y2 = aq(x2)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 3] = False
    assert torch.equal(y2[keep], y[keep])
    assert torch.allclose(y2[1, 3], y[1, 3] * 100, rtol=1e-4)  # positive scaling is equivariant
    assert torch.equal(ActQuantizer(16)(x), x)


def test_dtype_preserved_and_zero_group_no_nan():
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    w[1, :32] = 0
    for sym in (False, True):
        q = fake_quant(w, 3, sym, 32)
        assert q.dtype == torch.bfloat16 and torch.isfinite(q).all() and torch.all(q[1, :32] == 0)


def test_a_group_size_that_does_not_divide_leaves_a_shorter_last_group():
    w = torch.randn(8, 80)
    for sym in (False, True):
        q = fake_quant(w, 4, sym, 32)  # groups [0:32], [32:64], [64:80]
        assert q.shape == w.shape
        assert torch.equal(q[:, 64:], fake_quant(w[:, 64:], 4, sym))  # quantized on its own
        assert torch.equal(q[:, :64], fake_quant(w[:, :64], 4, sym, 32))


# --- QuantSpec -------------------------------------------------------------------------------

def test_spec_parse_and_defaults():
    s = QuantSpec.parse("w4a16g128")
    assert (s.w_bits, s.a_bits, s.group_size, s.w_sym, s.kv_bits) == (4, 16, 128, False, 16)
    assert s.weight_only and not s.is_fp and s.name == "w4a16g128"
    wa = QuantSpec.parse("w4a8")
    assert wa.w_sym and not wa.a_sym and wa.a_clip_ratio == 1.0 and not wa.weight_only
    assert QuantSpec.parse("w3a16g128_sym").w_sym and QuantSpec.parse("w3a16g128_sym").name == "w3a16g128_sym"
    assert QuantSpec.parse("w4a8_asym").name == "w4a8_asym"
    assert QuantSpec.parse("W4A4KV4").kv_bits == 4
    assert all(QuantSpec.parse(f).is_fp and QuantSpec.parse(f).name == "fp" for f in ("fp16", "bf16", "fp"))
    o = QuantSpec.parse("w4a16", group_size=128, w_sym=True)
    assert (o.group_size, o.w_sym, o.name) == (128, True, "w4a16g128_sym")
    assert QuantSpec.parse("w4a16g64", group_size=-1).group_size is None


@pytest.mark.parametrize("bad", ["w4", "a8", "w9a16", "w4a16g0", "w4a5", "w1a16", "w4a16kv9", "int4", ""])
def test_spec_bad_strings(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad)) + r": .*Valid forms: .*w4a16g128"):
        QuantSpec.parse(bad)


def test_spec_bad_options():
    with pytest.raises(ValueError, match="unknown QuantSpec option"):
        QuantSpec.parse("w4a16", groupsize=128)
    with pytest.raises(ValueError, match="a_clip_ratio"):
        QuantSpec.parse("w4a8", a_clip_ratio=1.5)


@given(w=st.integers(2, 8), a=st.sampled_from([4, 8, 16]), g=st.one_of(st.none(), st.integers(1, 4096)),
       sym=st.one_of(st.none(), st.booleans()), kv=st.sampled_from([16, 2, 3, 4, 8]))
def test_spec_name_roundtrip(w, a, g, sym, kv):
    spec = QuantSpec(w_bits=w, a_bits=a, group_size=g, w_sym=sym, kv_bits=kv)
    assert QuantSpec.parse(spec.name) == spec
    assert QuantSpec.parse(spec.name.upper()).name == spec.name


# --- model-level RTN and coverage ------------------------------------------------------------

@pytest.mark.parametrize("family", ["llada", "dream"])
def test_rtn_covers_every_block_linear(family):
    model = tiny_model(family)
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    info = rtn(model, "w4a16g16")
    expected = [f"blocks.{i}.{n}" for i in range(2) for n in LINEAR_NAMES]
    assert info == {"layers": 14} and sorted(quantized_layer_names(model)) == sorted(expected)
    sd = model.state_dict()
    assert sd.keys() == fp.keys()  # QuantLinear keeps the state-dict layout
    for k in ("embed.weight", "lm_head.weight"):
        assert torch.equal(sd[k], fp[k])
    for name in expected:
        w = sd[f"{name}.weight"]
        assert not torch.equal(w, fp[f"{name}.weight"])
        assert max(len(torch.unique(g)) for g in w.unflatten(-1, (-1, 16)).flatten(0, 1)) <= 16
    if family == "dream":  # biases stay FP
        assert torch.equal(sd["blocks.0.q_proj.bias"], fp["blocks.0.q_proj.bias"])


def test_exclude_patterns_and_lm_head():
    model = tiny_model("llada", tie=True)
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    info = rtn(model, "w4a16", exclude=["*.down_proj", "blocks.0.*"], lm_head=True)
    names = set(quantized_layer_names(model))
    assert names == {f"blocks.1.{n}" for n in LINEAR_NAMES if n != "down_proj"} | {"lm_head"}
    assert info["layers"] == 7
    assert torch.equal(model.blocks[1].down_proj.weight, fp["blocks.1.down_proj.weight"])
    assert torch.equal(model.blocks[0].q_proj.weight, fp["blocks.0.q_proj.weight"])
    assert torch.equal(model.embed.weight, fp["embed.weight"])  # tied head was untied first
    assert not torch.equal(model.lm_head.weight, fp["lm_head.weight"])


def test_quant_linear_shares_weights_and_transform_slot():
    lin = torch.nn.Linear(8, 4)
    ql = QuantLinear(lin, QuantSpec.parse("w4a16"))
    x = torch.randn(3, 8)
    assert ql.weight is lin.weight and ql.bias is lin.bias and torch.allclose(ql(x), lin(x))
    ql.input_transform = torch.nn.Identity()
    ql.input_transform.forward = lambda t: 2 * t
    assert torch.allclose(ql(x), lin(2 * x))


def logits_error(family: str, bits: str) -> float:
    model = tiny_model(family)
    with torch.no_grad():
        ref = model(IDS)
        rtn(model, bits)
        out = model(IDS)
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_rtn_error_is_monotone_in_bits(family):
    errs = [logits_error(family, f"w{b}a16") for b in (8, 4, 3, 2)]
    assert errs == sorted(errs) and errs[-1] > 3 * errs[1]
    w8a8 = logits_error(family, "w8a8")
    assert w8a8 < 0.01 and w8a8 < errs[1] / 4  # close to FP; far below even w4 weight-only


def test_kv_quant_is_installed_and_changes_output():
    model = tiny_model("dream")
    with torch.no_grad():
        ref = model(IDS)
        install_quantizers(model, QuantSpec.parse("w4a16kv2"))
        out = model(IDS)
    assert isinstance(model.blocks[1].k_quant, ActQuantizer) and model.blocks[1].v_quant.bits == 2
    assert not torch.allclose(out, ref)


# --- registry ----------------------------------------------------------------------------------

def test_registry():
    assert {"fp", "rtn"} <= set(methods.available())
    with pytest.raises(ValueError, match="available: .*fp.*rtn"):
        methods.get("nope")
    model = tiny_model("llada")
    assert methods.get("fp")(model, QuantSpec.parse("bf16"), None, {}) == {"layers": 0}
    assert quantized_layer_names(model) == []
    with pytest.raises(ValueError, match="bits=fp"):
        methods.get("fp")(model, QuantSpec.parse("w4a16"), None, {})
    with pytest.raises(ValueError, match="method=fp"):
        methods.get("rtn")(model, QuantSpec.parse("fp"), None, {})
    with pytest.raises(ValueError, match="already registered"):
        methods.register("rtn", methods.get("rtn").options)(lambda *a: {})
