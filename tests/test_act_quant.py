"""Activation and K/V quantization: per-token levels, symmetry, clipping, act_layers, K after RoPE,
and the quant: config options reaching the spec and the run's key."""

import pytest
import torch
from test_pipeline import config

from qdlm_bench import runspec
from qdlm_bench.models import LINEAR_NAMES
from qdlm_bench.models.presets import random_model
from qdlm_bench.models.transformer import apply_rope
from qdlm_bench.quant import QuantLinear, QuantSpec, fake_quant, install_quantizers

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def quantized_inputs(model) -> dict:
    """Run the model once; ``{linear name: (input, what F.linear received)}`` for every QuantLinear."""
    seen, hooks = {}, []

    def record(name):
        def hook(module, args, out):
            seen[name] = (args[0], out)
        return hook

    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            hooks.append(m.act_quant.register_forward_hook(record(name)))
    with torch.no_grad():
        model(IDS)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_every_linear_input_takes_at_most_2_pow_bits_levels_per_token(bits, sym):
    model = random_model("tiny-dream")
    install_quantizers(model, QuantSpec.parse(f"w8a{bits}", a_sym=sym))
    seen = quantized_inputs(model)
    assert sorted(seen) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in LINEAR_NAMES)
    for x, q in seen.values():
        rows_x, rows_q = x.reshape(-1, x.shape[-1]), q.reshape(-1, q.shape[-1])
        assert not torch.equal(rows_q, rows_x)
        assert max(len(torch.unique(r)) for r in rows_q) <= 2**bits
        step = (rows_q - rows_x).abs().amax(-1)  # within the range, error <= scale / 2
        if sym:  # a grid symmetric about 0: scale = max|x| / (2^(b-1) - 1), codes are integers
            scale = rows_x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
            codes = rows_q / scale
            assert torch.allclose(codes, codes.round(), atol=1e-3)
            assert torch.all(step <= scale[:, 0] / 2 * (1 + 1e-4))
        else:  # the range [min, max] is covered, with 0 exactly representable
            scale = (rows_x.amax(-1) - rows_x.amin(-1).clamp(max=0)) / (2**bits - 1)
            assert torch.all(step <= scale / 2 * (1 + 1e-4) + 1e-7)


@pytest.mark.parametrize("sym", [False, True])
def test_clip_ratio_shrinks_each_tokens_range(sym):
    x = torch.randn(3, 7, 64)
    q = fake_quant(x, 4, sym, clip_ratio=0.5)
    model = torch.nn.Linear(64, 8)
    layer = QuantLinear(model, QuantSpec.parse("w4a4", a_sym=sym, a_clip_ratio=0.5))
    assert torch.equal(layer.act_quant(x), q)
    top = x.abs().amax(-1, keepdim=True)
    assert torch.all(q.abs() < 0.6 * top)  # every token's range ends near half its max |x|
    unclipped = fake_quant(x, 4, sym)
    assert torch.allclose(unclipped.abs().amax(-1, keepdim=True), top, rtol=0.1)
    inside = x.abs() <= 0.4 * top
    assert (q - x)[inside].abs().mean() < 0.7 * (unclipped - x)[inside].abs().mean()  # a finer grid inside


def test_act_layers_restricts_which_inputs_are_quantized():
    model = random_model("tiny-llada")
    spec = QuantSpec.parse("w8a4", act_layers=["down_proj", "o_proj"])
    assert spec.act_layers == ("o_proj", "down_proj")  # canonical order
    assert spec.quantizes_input("blocks.1.o_proj") and not spec.quantizes_input("q_proj")
    assert not QuantSpec.parse("w4a16").quantizes_input("q_proj")
    install_quantizers(model, spec)
    for name, (x, q) in quantized_inputs(model).items():
        if name.endswith(("down_proj", "o_proj")):
            assert not torch.equal(q, x) and model.get_submodule(name).act_quant.bits == 4
        else:
            assert torch.equal(q, x) and model.get_submodule(name).act_quant.bits == 16


@pytest.mark.parametrize("bad, message", [
    (dict(act_layers=("q_proj", "nope")), r"unknown name\(s\) \['nope'\]"),
    (dict(act_layers=()), "non-empty"),
    (dict(act_layers="q_proj"), "non-empty list"),
    (dict(a_clip_ratio=0.0), r"\(0, 1\]"),
    (dict(a_sym="yes"), "true or false"),
])
def test_bad_activation_options(bad, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec.parse("w4a4", **bad)


def test_k_is_quantized_after_rope_and_v_too():
    model = random_model("tiny-dream")
    install_quantizers(model, QuantSpec.parse("w8a16kv3"))
    block, seen = model.blocks[0], {}
    for hook in ("k_quant", "v_quant"):
        getattr(block, hook).register_forward_hook(lambda m, args, out, hook=hook: seen.update({hook: (args[0], out)}))
    with torch.no_grad():
        model(IDS)
        cos, sin, _ = model.block_context(IDS)
        h = block.attn_norm(model.embed(IDS))
        k = block.k_proj(h).view(2, 16, block.n_kv_heads, block.head_dim).transpose(1, 2)
    k_in, k_q = seen["k_quant"]
    assert torch.allclose(k_in, apply_rope(k, cos, sin), atol=1e-6)  # the quantizer sees K after RoPE
    assert torch.equal(k_q, fake_quant(k_in, 3, False))  # per token and head: [B, H, L, head_dim] rows
    for x, q in seen.values():
        assert max(len(torch.unique(r)) for r in q.reshape(-1, block.head_dim)) <= 8 and not torch.equal(q, x)


# --- config: quant.act_* reach the spec and the run's key ----------------------------------------

def semantic(*overrides):
    return runspec.build(config("method=rtn", *overrides)).semantic()["quant"]


def test_activation_options_reach_the_spec_and_the_key():
    spec = runspec.build(config("method=rtn", "bits=w4a8", "quant.act_sym=true", "quant.act_clip_ratio=0.9",
                                "quant.act_layers=[down_proj,q_proj]")).quant
    assert (spec.a_sym, spec.a_clip_ratio, spec.act_layers) == (True, 0.9, ("q_proj", "down_proj"))
    default = semantic("bits=w4a8")
    assert default == {"bits": "w4a8", "exclude": [], "act_sym": False, "act_clip_ratio": 1.0,
                       "act_layers": list(LINEAR_NAMES)}
    variants = [semantic("bits=w4a8", o) for o in
                ("quant.act_sym=true", "quant.act_clip_ratio=0.9", "quant.act_layers=[down_proj]")]
    assert len({str(v) for v in [default, *variants]}) == 4  # different settings never share a record
    shuffled = "quant.act_layers=[v_proj,q_proj,k_proj,o_proj,up_proj,gate_proj,down_proj]"
    assert semantic("bits=w4a8", shuffled) == default
    # weight-only keys do not carry (or depend on) the activation options
    assert semantic("bits=w4a16") == semantic("bits=w4a16", "quant.act_sym=true") == {"bits": "w4a16", "exclude": []}


@pytest.mark.parametrize("override, message", [
    ("quant.act_layers=[q_proj,nope]", r"quant.act_\*.*unknown name\(s\) \['nope'\]; valid: q_proj"),
    ("quant.act_clip_ratio=1.5", r"quant.act_\*.*a_clip_ratio must be a number in \(0, 1\]"),
    ("quant.act_sym=maybe", r"quant.act_\*.*a_sym must be true or false"),
    ("bits=w4a5", "Valid forms"),
])
def test_bad_activation_config_fails_with_a_clear_message(override, message):
    with pytest.raises(runspec.ConfigError, match=message):
        runspec.build(config("method=rtn", "bits=w4a8", override))
