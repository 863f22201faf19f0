"""Each method's grid is its reference's: golden values from short implementations of the
references' formulas, written here from the formulas (not copied), against the shared quantizer,
GPTQ, AWQ's clipping and the methods' wiring; then the layer-error table on the embedded model.

References: GPTQ = IST-DASLab ``quant.py`` ``Quantizer.find_params`` (AutoGPTQ's
``auto_gptq/quantization/quantizer.py`` is the same) and ``gptq.py`` ``fasterquant``; QuaRot =
spcl/QuaRot ``fake_quant/quant_utils.py`` (``WeightQuantizer``, ``ActQuantizer``); DuQuant =
Hsu1023/DuQuant ``quantize/quantizer.py`` (``UniformAffineQuantizer``); SmoothQuant =
mit-han-lab/smoothquant ``smoothquant/fake_quant.py``; AWQ = mit-han-lab/llm-awq
``awq/quantize/auto_clip.py``.
"""

from types import SimpleNamespace

import pytest
import torch

from qdlm_bench import calibration, layer_error, methods
from qdlm_bench.calibration import CalibConfig
from qdlm_bench.methods.awq import quantize_clipped
from qdlm_bench.methods.gptq import gptq_quantize
from qdlm_bench.models import load_model
from qdlm_bench.models.presets import random_model
from qdlm_bench.paths import ZOO_DIR
from qdlm_bench.quant import ActQuantizer, QuantSpec, fake_quant, quantizer

# --- the references' formulas: parameters per row (token, group) of ``x``, then ``apply`` ----------
# Each returns ``(scale, zero, lowest code, highest code)``; ``apply`` is the references' common
# ``scale * (clamp(round(x / scale) + zero, lo, hi) - zero)``.


def apply(x, params):
    scale, zero, lo, hi = params
    return scale * (torch.clamp(torch.round(x / scale) + zero, lo, hi) - zero)


def gptq_params(x, bits, sym):
    """GPTQ/AutoGPTQ ``find_params``: range [min(x, 0), max(x, 0)]; symmetric takes -max|x| only
    when a value is negative, zero point (maxq + 1) / 2; an all-zero row gets [-1, 1]."""
    maxq = 2**bits - 1
    xmin = x.min(-1, keepdim=True).values.clamp(max=0)
    xmax = x.max(-1, keepdim=True).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero, 0, maxq


def quarot_weight_params(x, bits, sym):
    """QuaRot ``WeightQuantizer.find_params`` (no ``w_clip``): symmetric max|x| (floored at 1e-5) /
    (2^(b-1) - 1) over codes [-(maxq + 1), maxq]; asymmetric as GPTQ's with the range floored at 1e-5."""
    maxq = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
    xmin = x.min(-1, keepdim=True).values.clamp(max=0)
    xmax = x.max(-1, keepdim=True).values.clamp(min=0)
    if sym:
        scale = torch.maximum(xmin.abs(), xmax).clamp(min=1e-5) / maxq
        return scale, 0, -(maxq + 1), maxq
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin).clamp(min=1e-5) / maxq
    return scale, torch.round(-xmin / scale), 0, maxq


def quarot_act_params(x, bits, sym, clip=1.0):
    """QuaRot ``ActQuantizer.find_params`` (per token, no groups): the range [min(x, 0), max(x, 0)]
    times ``clip``; symmetric scale 1 where max|x| is 0."""
    maxq = 2 ** (bits - 1) - 1 if sym else 2**bits - 1
    xmin = x.min(-1, keepdim=True).values.clamp(max=0) * clip
    xmax = x.max(-1, keepdim=True).values.clamp(min=0) * clip
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        return torch.where(xmax == 0, 1.0, xmax / maxq), 0, -(maxq + 1), maxq
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    return scale, torch.round(-xmin / scale), 0, maxq


def smoothquant_params(x, bits):
    """SmoothQuant ``quantize_*_per_{channel,token}_absmax``: max|x| (floored at 1e-5) / (2^(b-1) - 1), no clamp."""
    scale = x.abs().max(-1, keepdim=True).values.clamp(min=1e-5) / (2 ** (bits - 1) - 1)
    return scale, 0, -float("inf"), float("inf")


def duquant_params(x, bits, sym, ratio=None):
    """DuQuant ``per_token_dynamic_calibration``: the range [min x, max x] times ``swc`` / ``lac``;
    symmetric zero point 2^(b-1) - 1 over codes [0, 2^b - 1]; scale in [1e-5, 1e4], zero in ±1e4."""
    xmin, xmax = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if ratio:
        xmin, xmax = ratio * xmin, ratio * xmax
    if sym:
        scale = (torch.max(xmax.abs(), xmin.abs()) / (2 ** (bits - 1) - 1)).clamp(1e-5, 1e4)
        zp = (2 ** (bits - 1) - 1) * torch.ones_like(scale)
    else:
        scale = ((xmax - xmin) / (2**bits - 1)).clamp(1e-5, 1e4)
        zp = -xmin / scale
    return scale, zp.clamp(-1e4, 1e4).round(), 0, 2**bits - 1


def rows(params):
    """Fake quantization of every row of ``x`` on the grid ``params`` fits to it."""
    return lambda x, *args: apply(x, params(x, *args))


def by_column_groups(params, x, group_size, *args):
    """GPTQ's and QuaRot's groups: each ``x[:, i:i + gs]`` slice on its own (the last one shorter)."""
    gs = group_size or x.shape[-1]
    return torch.cat([rows(params)(x[:, i:i + gs], *args) for i in range(0, x.shape[-1], gs)], -1)


def by_padded_groups(params, x, group_size, *args):
    """DuQuant's groups: rows reshaped to ``[-1, gs]`` after zero-padding a short last group."""
    pad = -x.shape[-1] % group_size
    xp = torch.cat([x, torch.zeros(x.shape[0], pad)], -1)
    return rows(params)(xp.reshape(-1, group_size), *args).reshape(xp.shape)[:, :x.shape[-1]]


def gptq_reference(W, H, bits, sym, group_size, params=gptq_params, blocksize=128, percdamp=0.01):
    """``fasterquant``, act_order off: per-row parameters from the weights as given; a group's, when
    it starts, from the full ``W``, which the lazy batch update changes only after each block."""
    W, H = W.clone(), H.clone()
    cols = W.shape[1]
    p = params(W, bits, sym)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(cols), range(cols)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        blk, err = W[:, b0:b1].clone(), torch.zeros(W.shape[0], b1 - b0)
        for j in range(b1 - b0):
            c = b0 + j
            if group_size and c % group_size == 0:
                p = params(W[:, c:c + group_size], bits, sym)
            Q[:, c] = apply(blk[:, j:j + 1], p)[:, 0]
            err[:, j] = (blk[:, j] - Q[:, c]) / Hinv[c, c]
            blk[:, j:] -= err[:, j:j + 1].matmul(Hinv[c:c + 1, c:b1])
        W[:, b1:] -= err.matmul(Hinv[b0:b1, b1:])
    return Q


# --- fixed data ---------------------------------------------------------------------------------

GEN = torch.Generator().manual_seed(16)
MAT = torch.randn(6, 40, generator=GEN) * 0.1  # groups of 16: 16, 16 and a shorter 8
MAT[0, :16] = MAT[0, :16].abs()  # a group with no negative value (GPTQ keeps lo = 0)
MAT[1] = MAT[1].abs() + 0.05  # a row of one sign (DuQuant's range leaves 0 out)
MAT[2, 5] = 0.9  # an outlier: clipping matters
MAT[3, 32:] = 0  # an all-zero (short) group
TOKENS = torch.randn(2, 5, 40, generator=GEN)
TOKENS[0, 1] = TOKENS[0, 1].abs()  # a token of one sign
TOKENS[1, 2] = 0  # an all-zero token
GW = torch.randn(8, 200, generator=GEN) * 0.05  # g64, blocks of 128: the group at 64 starts inside a block
_X = torch.randn(512, 24, generator=GEN) @ torch.randn(24, 200, generator=GEN)
_X += 0.1 * torch.randn(512, 200, generator=GEN)
GH = 2 / len(_X) * _X.T @ _X  # correlated inputs: GPTQ's updates are large


# --- hand-checked values (2 bits, one row) -------------------------------------------------------

X = torch.tensor([[-1.0, -0.4, 0.2, 0.6]])
POS = torch.tensor([[0.2, 0.4, 0.6, 1.0]])


@pytest.mark.parametrize("x,sym,grid,clip,expected", [
    (X, True, "gptq", 1.0, [-4 / 3, -2 / 3, 0, 2 / 3]),  # scale 2/3: all four codes
    (X, True, "absmax", 1.0, [-1, 0, 0, 1]),  # scale 1: codes -1..1
    (X, True, "absmax", 0.5, [-1, -0.5, 0, 0.5]),  # the extra code is negative
    (X, True, "duquant", 0.5, [-0.5, -0.5, 0, 0.5]),  # ... and positive here
    (X, False, "gptq", 1.0, [-16 / 15, -8 / 15, 0, 8 / 15]),  # scale 1.6/3, zero 2
    (POS, True, "gptq", 1.0, [1 / 3] * 4),  # no negative value: range [0, 1], codes up to 1
    (POS, False, "absmax", 1.0, [1 / 3, 1 / 3, 2 / 3, 1]),  # range [0, 1]
    (POS, False, "duquant", 1.0, [0.8 / 3, 1.6 / 3, 1.6 / 3, 3.2 / 3]),  # range [0.2, 1], zero -1
])
def test_hand_checked_values(x, sym, grid, clip, expected):
    expected = torch.tensor([expected], dtype=torch.float)
    assert torch.allclose(fake_quant(x, 2, sym, None, clip, grid), expected, rtol=0, atol=1e-6)


def test_unknown_grid_is_named():
    with pytest.raises(ValueError, match="unknown quantization grid 'int'; valid: absmax, gptq, duquant"):
        fake_quant(X, 4, True, grid="int")
    with pytest.raises(ValueError, match="a_grid must be one of"):
        QuantSpec.parse("w4a4", a_grid="int")


# --- the shared quantizer against each reference -------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [16, None])
def test_weight_grids_equal_their_references(bits, sym, group_size):
    gptq = by_column_groups(gptq_params, MAT, group_size, bits, sym)
    quarot = by_column_groups(quarot_weight_params, MAT, group_size, bits, sym)
    assert torch.equal(fake_quant(MAT, bits, sym, group_size, grid="gptq"), gptq)
    assert torch.equal(fake_quant(MAT, bits, sym, group_size, grid="absmax"), quarot)
    if sym:  # SmoothQuant is symmetric only
        assert torch.equal(quarot, by_column_groups(smoothquant_params, MAT, group_size, bits))
        assert not torch.equal(gptq, quarot)
    for swc in (None, 0.8):  # DuQuant pads a short last group with zeros
        duq = by_padded_groups(duquant_params, MAT, group_size or 40, bits, sym, swc)
        assert torch.equal(fake_quant(MAT, bits, sym, group_size, swc or 1.0, "duquant"), duq)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_activation_grids_equal_their_references(bits, sym):
    for clip in (1.0, 0.9):  # QuaRot's a_clip_ratio, DuQuant's lac
        assert torch.equal(ActQuantizer(bits, sym, clip)(TOKENS), rows(quarot_act_params)(TOKENS, bits, sym, clip))
        duq = rows(duquant_params)(TOKENS, bits, sym, clip)
        assert torch.equal(ActQuantizer(bits, sym, clip, grid="duquant")(TOKENS), duq)
    if sym:
        assert torch.equal(ActQuantizer(bits, True)(TOKENS), rows(smoothquant_params)(TOKENS, bits))
    clip = 0.9 if sym else 1.0  # symmetric: the extra code's side; asymmetric: the one-signed token
    assert not torch.equal(ActQuantizer(bits, sym, clip, grid="duquant")(TOKENS), ActQuantizer(bits, sym, clip)(TOKENS))


@pytest.mark.parametrize("sym", [True, False])
def test_awq_clip_clamps_as_the_reference(sym):
    """llm-awq ``auto_clip``/``apply_clip``: each group clamped to ±r max|w|, then quantized (GPTQ's grid)."""
    ratios = torch.tensor([1.0, 0.95, 0.55])[torch.randint(0, 3, (6, 3, 1), generator=GEN)]
    gs, out = 16, []
    for i in range(3):
        g = MAT[:, i * gs:(i + 1) * gs]
        m = g.abs().amax(-1, keepdim=True) * ratios[:, i]
        out.append(rows(gptq_params)(torch.clamp(g, -m, m), 4, sym))
    assert torch.equal(quantize_clipped(MAT, 4, sym, gs, ratios), torch.cat(out, -1))


# --- GPTQ ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [64, None])
@pytest.mark.parametrize("grid,params", [("gptq", gptq_params), ("absmax", quarot_weight_params)])
def test_gptq_equals_the_reference(bits, sym, group_size, grid, params):
    ours, _ = gptq_quantize(GW, GH, bits, sym, group_size, grid=grid)
    assert torch.equal(ours, gptq_reference(GW, GH, bits, sym, group_size, params))


# --- each method passes its reference's grid ----------------------------------------------------

CALIB = SimpleNamespace(input_ids=torch.randint(0, 128, (4, 32), generator=GEN))


@pytest.mark.parametrize("method,bits,opts,weights,acts", [
    ("rtn", "w4a8g32", {}, "gptq", "absmax"),
    ("gptq", "w4a16g32_sym", {}, "gptq", None),
    ("awq", "w4a16g32_sym", {"n_grid": 2}, "gptq", None),
    ("smoothquant", "w8a8", {}, "absmax", "absmax"),
    ("quarot", "w4a4kv4", {}, "absmax", "absmax"),
    ("quarot", "w4a4kv4", {"weights": "rtn"}, "absmax", "absmax"),
    ("duquant", "w4a4kv4", {"steps": 4}, "duquant", "duquant"),
])
def test_each_method_passes_its_grid(monkeypatch, method, bits, opts, weights, acts):
    model, seen = random_model("tiny-llada").eval(), []
    qrange = quantizer.qrange
    monkeypatch.setattr(quantizer, "qrange", lambda b, s, grid="absmax": seen.append(grid) or qrange(b, s, grid))
    methods.get(method)(model, QuantSpec.parse(bits), CALIB, opts)
    assert set(seen) == {weights}  # every weight quantized on it (activations are installed, not run)
    installed = {m.grid for m in model.modules() if isinstance(m, ActQuantizer) and m.bits < 16}
    assert installed == ({acts} if acts else set())


# --- the layer-error table: ours vs the references' formulas on the embedded model's activations --

LAYERS = ("blocks.2.q_proj", "blocks.2.up_proj", "blocks.2.down_proj")


@pytest.fixture(scope="module")
def embedded():
    """tiny-llada-instruct (float32): block 2's q/up/down weights and the Gram matrices of their FP
    inputs on the default tiny calibration set (``calib=tiny``: zoo_mix, 32 x 256)."""
    model, tok = load_model(ZOO_DIR / "tiny-llada-instruct", dtype=torch.float32)
    calib = calibration.build(CalibConfig(source="zoo_mix", n_samples=32, seqlen=256), tok,
                              model.config.mask_token_id, cache_dir=None)
    grams = layer_error.gram_matrices(model.eval(), calib)
    return {n: (model.get_submodule(n).weight.data, grams[n]) for n in LAYERS}


def test_layer_error_table_ours_vs_reference(embedded):
    """Relative output error, ours / the reference formulas', RTN and GPTQ; printed (``-s``) as a
    table with the former symmetric grid (max|w| / (2^(b-1) - 1)) for contrast."""
    lines = ["| layer | bits | weights | g | RTN ours/ref | GPTQ ours/ref | former grid: RTN/ref | GPTQ/ref |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (W, gram) in embedded.items():
        err = lambda Q: layer_error.relative_error(W, Q, gram)  # noqa: E731
        for bits in (4, 3):
            for sym in (True, False):
                for gs in (128, 64):
                    rtn_ref, gptq_ref = err(by_column_groups(gptq_params, W, gs, bits, sym)), \
                        err(gptq_reference(W, gram, bits, sym, gs))
                    rtn = err(fake_quant(W, bits, sym, gs, grid="gptq")) / rtn_ref
                    gptq = err(gptq_quantize(W, gram, bits, sym, gs)[0]) / gptq_ref
                    former = (f"{err(fake_quant(W, bits, sym, gs, grid='absmax')) / rtn_ref:.3f} | "
                              f"{err(gptq_quantize(W, gram, bits, sym, gs, grid='absmax')[0]) / gptq_ref:.3f}"
                              if sym else "= | =")
                    lines.append(f"| {name} | w{bits} | {'sym' if sym else 'asym'} | {gs} | {rtn:.4f} | {gptq:.4f} "
                                 f"| {former} |")
                    assert abs(rtn - 1) <= 0.02 and abs(gptq - 1) <= 0.02, lines[-1]
    print("\n" + "\n".join(lines))
