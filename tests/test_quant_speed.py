"""The fast activation path is exact: ``fake_quant`` (in place) against its definition
(``fake_quant_reference``: quantize, then dequantize) bit for bit, and ``QuantLinear``'s shared
input (q/k/v_proj, gate/up_proj quantize their one input once) against each linear on its own."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from qdlm_bench import methods
from qdlm_bench.models.presets import random_model
from qdlm_bench.quant import QuantLinear, QuantSpec, install_quantizers
from qdlm_bench.quant import linear as linear_module
from qdlm_bench.quant.quantizer import fake_quant, fake_quant_reference
from qdlm_bench.quant.rotation import BlockRotation
from qdlm_bench.quant.spec import GRIDS

IDS = torch.randint(0, 126, (3, 24), generator=torch.Generator().manual_seed(3))


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits_of(a), bits_of(b))


def inputs(dtype: torch.dtype):
    """Rows of every kind a quantizer meets: scales from 1e-6 to 1e4, all-positive rows, all-zero
    and all-negative rows, values on the grid (ties of the rounding), and exact zeros."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 100, generator=g) * 10.0 ** torch.randint(-6, 5, (48, 1), generator=g).float()
    x[1::6] = x[1::6].abs()
    x[2::6] = 0.0
    x[3::6] = -x[3::6].abs()
    x[4::6] = torch.randint(-8, 9, (8, 100), generator=g).float() * 0.125
    x[5::6, ::7] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_equals_its_definition_bit_for_bit(grid, sym, dtype):
    x = inputs(dtype)
    for bits, clip, group_size in itertools.product([2, 3, 4, 8], [1.0, 0.9, 0.5], [None, 32, 48]):
        fast = fake_quant(x, bits, sym, group_size, clip, grid)
        assert same_bits(fast, fake_quant_reference(x, bits, sym, group_size, clip, grid)), (bits, clip, group_size)


def test_fake_quant_leaves_its_input_alone_and_takes_per_head_ratios():
    x = torch.randn(2, 4, 16, 8)
    before = x.clone()
    ratio = (torch.rand(4) + 0.5).view(-1, 1, 1, 1)  # a K/V quantizer's head_range
    for grid, sym in itertools.product(GRIDS, [False, True]):
        assert same_bits(fake_quant(x, 4, sym, None, ratio, grid), fake_quant_reference(x, 4, sym, None, ratio, grid))
    assert same_bits(x, before)


def test_fake_quant_rows_with_inf_or_nan_are_alike_but_for_nan_bits():
    g = torch.Generator().manual_seed(1)
    for seed in range(20):
        x = torch.randn(8, 16, generator=g)
        for special in [float("inf"), -float("inf"), float("nan")]:
            x[seed % 8, (3 * seed) % 16] = special
        finite = x.isfinite().all(1)
        for grid, sym in itertools.product(GRIDS, [False, True]):
            a, b = fake_quant(x, 4, sym, grid=grid), fake_quant_reference(x, 4, sym, grid=grid)
            assert same_bits(a[finite], b[finite])
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def separate(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What ``layer`` computes on its own (the path before inputs were shared)."""
    h = x if layer.input_transform is None else layer.input_transform(x)
    return F.linear(fake_quant_reference(h, layer.act_quant.bits, layer.act_quant.sym, None,
                                         layer.act_quant.clip_ratio, layer.act_quant.grid), layer.weight, layer.bias)


def siblings(transform=None, spec="w8a8", n=3, **kw):
    torch.manual_seed(0)
    return [QuantLinear(torch.nn.Linear(32, 16), QuantSpec.parse(spec, **kw), transform) for _ in range(n)]


@pytest.mark.parametrize("mode", ["inference", "no_grad", "grad"])
@pytest.mark.parametrize("with_transform", [False, True])
def test_linears_reading_one_input_quantize_it_once_with_the_same_values(monkeypatch, mode, with_transform):
    torch.manual_seed(0)
    transform = None
    if with_transform:
        q = torch.linalg.qr(torch.randn(2, 16, 16)).Q
        transform = BlockRotation(q, torch.randperm(32), q.flip(0))
    layers = siblings(transform, a_clip_ratio=0.9)
    calls = []
    real = linear_module.fake_quant
    monkeypatch.setattr(linear_module, "fake_quant", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(5, 7, 32, requires_grad=mode == "grad")
    ctx = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
    with ctx():
        outs = [layer(x) for layer in layers]
        assert len(calls) == 1
        for layer, out in zip(layers, outs):
            assert same_bits(out, separate(layer, x))
        y = torch.randn(5, 7, 32)
        layers[0](y)
        layers[1](y)
        assert len(calls) == 2


def test_an_input_changed_in_place_or_another_setting_is_quantized_again():
    a, b = siblings(n=2)
    c = siblings(spec="w8a8", n=1, a_sym=True)[0]
    x = torch.randn(4, 32)
    with torch.no_grad():
        a(x)
        x.mul_(3.0)  # the version counter moves
        assert same_bits(b(x), separate(b, x))
        assert same_bits(c(x), separate(c, x))  # symmetric: another key


def test_hooked_quantizers_still_see_every_linear():
    layers = siblings()
    seen = []
    hooks = [layer.act_quant.register_forward_pre_hook(lambda m, args, i=i: seen.append(i))
             for i, layer in enumerate(layers)]
    with torch.inference_mode():
        x = torch.randn(4, 32)
        for layer in layers:
            layer(x)
    for h in hooks:
        h.remove()
    assert seen == [0, 1, 2]


def test_the_shared_input_is_dropped_with_the_input():
    layer = siblings(n=1)[0]
    with torch.inference_mode():
        x = torch.randn(4, 32)
        layer(x)
        assert linear_module._LAST.out is not None
        del x
    assert linear_module._LAST.out is None


@pytest.mark.parametrize("method,bits", [("rtn", "w8a8"), ("quarot", "w4a4kv4")])
def test_quantized_model_logits_are_bit_identical_to_the_separate_path(monkeypatch, method, bits):
    model = random_model("tiny-llada", seed=2).eval()
    opts = {"weights": "rtn"} if method == "quarot" else {}
    methods.get(method)(model, QuantSpec.parse(bits), torch.zeros(1, 8, dtype=torch.long), opts)
    with torch.inference_mode():
        fast = model(IDS)
    monkeypatch.setattr(linear_module, "fake_quant", fake_quant_reference)
    monkeypatch.setattr(QuantLinear, "prepared_input", lambda self, x: (
        self.act_quant(x if self.input_transform is None else self.input_transform(x))))
    with torch.inference_mode():
        assert same_bits(fast, model(IDS))


def test_reinstalling_quantizers_keeps_sharing_exact():
    model = random_model("tiny-dream", seed=4).eval()
    spec = QuantSpec.parse("w8a4")
    install_quantizers(model, spec)
    install_quantizers(model, spec)
    with torch.no_grad():
        out = model(IDS)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act_quant.register_forward_pre_hook(lambda *a: None)  # hooks switch sharing off
    with torch.no_grad():
        assert same_bits(out, model(IDS))


@pytest.mark.parametrize("method,bits", [("rtn", "w8a8"), ("quarot", "w4a4")])
def test_forward_bench_times_a_quantized_embedded_shape_against_fp(method, bits):
    from qdlm_bench.bench import forward
    threads = torch.get_num_threads()
    try:
        result = forward.run(["shape=tiny-llada-instruct", f"bits={bits}", f"method={method}", "batch=2",
                              "seq_len=16", "logits=4", "warmup=0", "repeats=2", "threads=1"])
    finally:
        torch.set_num_threads(threads)
    assert result["threads"] == 1 and result[method]["bits"] == bits
    assert result["fp"]["ms"] > 0 and result[method]["ms"] > 0 and result["ratio"] > 0
    assert result["timed_in_turns"] == (not torch.cuda.is_available())
    assert 0 < result["logits_rel_err"] < 1  # quantized, and still close
    assert result["target_ratio"] == (1.3 if bits == "w8a8" else 1.5)


@pytest.mark.parametrize("arg,match", [("shape=tiny-nothing", "tiny-llada-instruct"), ("method=gptq", "rtn")])
def test_forward_bench_names_what_it_runs(arg, match):
    from qdlm_bench.bench import forward
    with pytest.raises(SystemExit, match=match):
        forward.run([arg, "bits=w8a8"])
