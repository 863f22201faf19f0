"""Integer codes of fake-quantized weights, recovered exactly, and their packing.

A quantized weight holds, in the model's dtype ``D``, ``D(fl32((q - z) * s))`` per group: every
grid of ``quant.quantizer`` dequantizes that way (integer ``c = q - z``, float32 ``s``), and
methods keep neither ``s`` nor ``z`` (GPTQ's and AWQ's cannot be recomputed from the output).
``recover`` finds, per group, integer codes ``c`` spanning at most ``2^b`` values and a float32
scale ``s`` such that dequantizing with the same arithmetic (``dequantize``: the float32 product,
then a cast to ``D``) gives back every stored value bit for bit. Per group, vectorized over groups:

1. a code ``n`` for the largest |value| (its estimate from the span if the codes cover all ``2^b``
   levels, the symmetric grids' end codes, the span over the smallest gap between values, then
   ``n ± 1, ± 2, ...``) bounds ``s`` to the values that round ``n s`` to it: half a unit in the
   last place of ``D`` each side (plus half a float32 one below float32: the product is rounded
   twice);
2. every value whose code is the only one fitting that interval narrows it further, until
   nothing changes;
3. the interval's midpoint rounded to float32 and its neighbours are tried; where a value still
   admits two codes (low-precision ``D`` at 8 bits), a sweep over the intervals its codes allow
   finds a scale every value accepts;
4. a candidate counts only when the group dequantizes bit-exactly with codes spanning at most
   ``2^b - 1`` steps.

The scale found need not be the method's own (any scale reproducing the weights will do), and codes
are stored unsigned, ``u = c + zero`` in ``[0, 2^b - 1]`` with an integer ``zero`` per group
(``2^(b-1)`` for every group when all codes fit the signed range: a symmetric layer). ``recover``
returns None when some group has no exact representation, e.g. GPTQ with ``act_order`` and no
``static_groups``, whose groups are not contiguous columns (after 20 tries with more than 5% of a
chunk's groups unsolved it stops looking); callers then keep that layer unpacked. The whole layer
is checked once more with ``dequantize`` before it is accepted.

Packing: ``pack_bytes`` puts two codes per byte for up to 4 bits (low nibble first) and one per
byte for 5..8 bits; ``pack_int32`` is compressed-tensors' dense ``pack-quantized`` layout (``b``
bits per code, 32 / b codes per int32 for b = 4 and 8, least significant bits first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdlm_bench.quant.quantizer import group, ungroup

MANTISSA_BITS = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
INT_VIEW = {4: torch.int32, 2: torch.int16}
ROW_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}  # weights per recovery pass (float64 temporaries)


@dataclass
class Codes:
    """A layer's exact integer form: ``W = D(fl32((codes - zero) * scale))`` per group."""

    codes: torch.Tensor  # uint8 [out, in], in [0, 2^bits - 1]
    scale: torch.Tensor  # float32 [out, n_groups]
    zero: torch.Tensor  # int32 [out, n_groups]
    bits: int
    group_size: int | None

    @property
    def symmetric(self) -> bool:
        """Every group's zero is ``2^(bits-1)``: the signed codes ``codes - 2^(bits-1)`` need no zero point."""
        return bool((self.zero == 2 ** (self.bits - 1)).all())


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None,
               dtype: torch.dtype) -> torch.Tensor:
    """``(codes - zero) * scale`` per group in float32, cast to ``dtype``: the fake quantizer's own
    arithmetic (``quant.quantizer.fake_quant``), so a recovered layer reproduces its weights exactly."""
    g = group(codes, group_size)
    return ungroup((g - zero.float()[..., None]) * scale[..., None], codes.shape[-1]).to(dtype)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (``-0.0`` differs from ``0.0``; a NaN equals the same NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = INT_VIEW.get(a.element_size())
    return torch.equal(a.view(view), b.view(view)) if view is not None else torch.equal(a, b)


def _half_ulps(a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """How far below and above ``a`` (float64 magnitudes > 0 representable in ``dtype``) a product
    may lie and still come out as ``a``: half the gaps of ``dtype``, plus, for a dtype narrower than
    float32, half a float32 gap (the product is rounded to float32 first: a value just past a tie
    of ``dtype`` can land on it and round to even)."""
    mantissa, exponent = torch.frexp(a)  # a = m 2^e, m in [0.5, 1)
    up = torch.ldexp(torch.ones_like(a), exponent - 1 - MANTISSA_BITS[dtype])
    down = torch.where(mantissa == 0.5, up / 2, up)  # below a power of two the spacing halves
    if dtype != torch.float32:
        f32 = torch.ldexp(torch.ones_like(a), exponent - 1 - MANTISSA_BITS[torch.float32])
        return down / 2 + f32, up / 2 + f32
    return down / 2, up / 2


def _narrow(low: torch.Tensor, high: torch.Tensor, live: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
            passes: int = 8):
    """Narrow each group's scale interval ``[lo, hi]`` ``[N]`` by its values: value ``i`` (magnitude
    range ``[low_i, high_i]`` ``[N, S]``, ``live`` where nonzero) needs an integer ``c >= 1`` with
    ``c s`` in its range; where one code alone fits the interval, the interval shrinks to what that
    code allows, and the next pass reads the codes again. Returns ``(lo, hi, feasible)``."""
    dead = torch.zeros_like(lo, dtype=torch.bool)
    for _ in range(passes):
        first, last = torch.ceil(low / hi[:, None]), torch.floor(high / lo[:, None])
        dead |= (live & (first > last)).any(-1)  # no code fits this value: not this scale range
        one = live & (first == last) & (first >= 1)
        c = first.clamp(min=1)
        new_lo = torch.maximum(lo, torch.where(one, low / c, 0.0).amax(-1))
        new_hi = torch.minimum(hi, torch.where(one, high / c, torch.inf).amin(-1))
        if torch.equal(new_lo, lo) and torch.equal(new_hi, hi):
            break
        lo, hi = new_lo, new_hi
    return lo, hi, ~dead & (lo <= hi)


def _codes_at(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor, live: torch.Tensor, s: torch.Tensor,
              smallest: bool = True):
    """``(codes [N, S], every value fits)``: at scale ``s`` ``[N]``, each value's code of smallest
    (else largest) magnitude whose product stays in its range, signed as the value (0 for zeros).
    Where a value admits two codes, the smallest keep a zero-straddling group's span least."""
    c = torch.ceil(low / s[:, None]).clamp(min=1) if smallest else torch.floor(high / s[:, None])
    fits = ~live | ((c >= 1) & (c * s[:, None] >= low) & (c * s[:, None] <= high))
    return torch.where(live, torch.sign(v) * c, 0.0), fits.all(-1)


def _feasible_point(low: torch.Tensor, high: torch.Tensor, live: torch.Tensor, lo: torch.Tensor,
                    hi: torch.Tensor, max_codes: int = 4):
    """A scale in ``[lo, hi]`` ``[M]`` at which every live value has a code (``c s`` in its range), by a
    sweep over the intervals each value's candidate codes allow: where a value admits two codes the
    scales between their intervals are excluded, so the midpoint of ``[lo, hi]`` can fail while
    other scales succeed. Returns ``(point, found)``, the middle of the widest feasible piece."""
    first = torch.ceil(low / hi[:, None]).clamp(min=1)
    last = torch.floor(high / lo[:, None])
    starts, ends = [], []
    for j in range(max_codes):
        c = first + j
        a, b = torch.maximum(lo[:, None], low / c), torch.minimum(hi[:, None], high / c)
        use = live & (c <= last) & (a <= b)
        starts.append(torch.where(use, a, torch.inf))
        ends.append(torch.where(use, b, torch.inf))
    pos = torch.cat(starts + ends, -1)
    kind = torch.cat([torch.ones_like(pos[:, :pos.shape[1] // 2]), -torch.ones_like(pos[:, :pos.shape[1] // 2])], -1)
    kind = torch.where(torch.isinf(pos), 0.0, kind)
    order = torch.argsort(-kind, dim=-1, stable=True)  # at equal positions, starts before ends (closed intervals)
    pos, kind = pos.gather(-1, order), kind.gather(-1, order)
    order = torch.argsort(pos, dim=-1, stable=True)
    pos, kind = pos.gather(-1, order), kind.gather(-1, order)
    covered = kind.cumsum(-1)
    need = live.sum(-1, keepdim=True).to(covered.dtype)
    nxt = torch.cat([pos[:, 1:], torch.full_like(pos[:, :1], torch.inf)], -1)
    width = torch.where((covered == need) & (kind > 0) & torch.isfinite(nxt), nxt - pos, -1.0)
    best = width.argmax(-1, keepdim=True)
    found = width.gather(-1, best)[:, 0] >= 0
    point = (pos.gather(-1, best) + nxt.gather(-1, best))[:, 0] / 2
    return torch.where(found, point, (lo + hi) / 2), found


def _try_anchor(v: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, n: torch.Tensor, levels: int,
                dtype: torch.dtype):
    """Groups ``v`` ``[N, S]`` (float64 values of ``dtype``; ``valid`` masks padding; ``target`` the
    float32 values) tried with code ``n`` ``[N]`` for their largest |value|: the scale interval that
    code allows, narrowed by the other values, then float32 scales in it checked bit for bit with
    the dequantization's own arithmetic. Returns ``(ok [N], scale [N] float32, codes [N, S] int64)``."""
    a = v.abs()
    live = valid & (a > 0)
    down, up = _half_ulps(torch.where(live, a, 1.0), dtype)
    low, high = a - down, a + up
    top = torch.where(live, a, 0.0).argmax(-1, keepdim=True)
    lo = (low.gather(-1, top)[:, 0] / n).clamp(min=0)
    hi = high.gather(-1, top)[:, 0] / n
    lo, hi, ok = _narrow(low, high, live, lo, hi)
    has_code = live.any(-1)
    ok &= torch.where(valid & ~live, v == 0, True).all(-1)  # the zeros are exact zeros
    lo, hi = torch.where(has_code & ok, lo, 1.0), torch.where(has_code & ok, hi, 1.0)
    mid = ((lo + hi) / 2).float()
    found = torch.zeros_like(ok)
    scale = torch.ones_like(mid)
    codes = torch.zeros_like(v)
    swept = {}

    def sweep(shift: int):  # a feasible point where the midpoint fails (computed once, for those groups)
        if "point" not in swept:
            todo = (ok & ~found).nonzero().squeeze(-1)
            point = mid.clone()
            if len(todo):
                point[todo] = _feasible_point(low[todo], high[todo], live[todo], lo[todo], hi[todo])[0].float()
            swept["point"] = point
        p = swept["point"]
        return p if shift == 0 else torch.nextafter(p, p.new_tensor(torch.inf if shift > 0 else -torch.inf))

    steps = [lambda: mid, lambda: torch.nextafter(mid, mid.new_tensor(torch.inf)),
             lambda: torch.nextafter(mid, mid.new_tensor(-torch.inf)), lambda: sweep(0), lambda: sweep(1),
             lambda: sweep(-1)]
    # the interval's midpoint and its float32 neighbours; where they fail, a swept feasible point;
    # each with the smallest codes, then the largest (a one-signed group's span can need those)
    for step, smallest in [(step, smallest) for smallest in (True, False) for step in steps]:
        todo = (ok & ~found).nonzero().squeeze(-1)
        if not len(todo):
            break
        cand = step()[todo]
        vt, valid_t, live_t = v[todo], valid[todo], live[todo]
        c, fits = _codes_at(vt, low[todo], high[todo], live_t, cand.double(), smallest)
        big, small = torch.where(valid_t, c, -torch.inf).amax(-1), torch.where(valid_t, c, torch.inf).amin(-1)
        exact = (c.float() * cand[:, None]).to(dtype).float()
        same = ((exact.view(torch.int32) == target[todo].view(torch.int32)) | ~valid_t).all(-1)
        hit = fits & (cand > 0) & (~has_code[todo] | (big - small <= levels)) & same
        found[todo] = hit
        scale[todo] = torch.where(hit, cand, scale[todo])
        codes[todo] = torch.where(hit[:, None], c, codes[todo])
    return found, scale, codes.long()


MAX_TRIES = 4096  # anchor codes tried per group at most (the right one is usually the first)
GIVE_UP_AFTER, GIVE_UP_SHARE = 20, 0.05  # after 20 tries, more than 5% unsolved: not this grid's groups


def _recover_rows(w: torch.Tensor, bits: int, group_size: int | None):
    """``(codes c [R, G, S] int64, scale [R, G] float32)`` of rows ``w`` ``[R, in]``, or None."""
    dtype, d = w.dtype, w.shape[-1]
    target = group(w, group_size)  # float32 (exact for D), zero-padded
    R, G, S = target.shape
    valid = torch.ones(G, S, dtype=torch.bool, device=w.device)
    if d % S:
        valid[-1, d % S:] = False
    v = torch.where(valid, target.double(), target[..., :1].double())  # padding repeats a real value
    v, target = v.reshape(R * G, S), target.reshape(R * G, S)
    valid = valid.expand(R, G, S).reshape(R * G, S)
    levels = 2**bits - 1
    vmax, vmin = v.amax(-1), v.amin(-1)
    span = vmax - vmin
    top = torch.maximum(vmax.abs(), vmin.abs())  # the largest |value|, whose code n sets s = top / n
    flat = span == 0  # one value: 0, or a single code
    safe_span = torch.where(flat, 1.0, span)
    gaps = v.sort(-1).values.diff(dim=-1)
    steps = (span / torch.where(gaps > 0, gaps, torch.inf).amin(-1)).round().clamp(1, levels)
    # the largest value's code if the codes span every level (asymmetric grids: min and max are
    # their ends), at a symmetric grid's ends, and if adjacent values differ by one code
    n_full = torch.where(flat, 1.0, (top * levels / safe_span).round().clamp(min=1))
    n_max = torch.where(flat, 1.0, (top * levels / safe_span).ceil() + 2)
    first = [n_full, torch.full_like(n_full, 2 ** (bits - 1) - 1 or 1), torch.full_like(n_full, 2 ** (bits - 1)),
             torch.where(flat, 1.0, (top * steps / safe_span).round().clamp(min=1))]
    ok = torch.zeros(R * G, dtype=torch.bool, device=w.device)
    scale = torch.ones(R * G, device=w.device)
    codes = torch.zeros(R * G, S, dtype=torch.long, device=w.device)
    reach = torch.maximum(n_full - 1, n_max - n_full)  # offsets from n_full that still hold codes in [1, n_max]
    tries = 0
    for i in range(int(min(reach.max().item(), MAX_TRIES)) + 1):
        if bool((ok | (reach < i)).all()):
            break
        for n in (first if i == 0 else [n_full + i, n_full - i]):
            todo = (~ok & (n >= 1) & (n <= n_max)).nonzero().squeeze(-1)
            if not len(todo):
                continue
            hit, s, c = _try_anchor(v[todo], valid[todo], target[todo], n[todo], levels, dtype)
            ok[todo] = hit
            scale[todo] = torch.where(hit, s, scale[todo])
            codes[todo] = torch.where(hit[:, None], c, codes[todo])
            tries += 1
            if tries == GIVE_UP_AFTER and (~ok).float().mean() > GIVE_UP_SHARE:
                return None
    if not ok.all():
        return None
    return codes.reshape(R, G, S), scale.reshape(R, G)


@torch.no_grad()
def recover(w: torch.Tensor, bits: int, group_size: int | None) -> Codes | None:
    """The exact ``Codes`` of a fake-quantized weight ``w`` ``[out, in]`` (float32/bfloat16/float16)
    at ``bits`` with ``group_size`` (None: one group per row), or None when some group has none."""
    if w.dtype not in MANTISSA_BITS or w.ndim != 2 or not 1 <= bits <= 8:
        return None
    rows = max(1, ROW_CHUNK_ELEMENTS.get(w.device.type, 1 << 22) // max(1, w.shape[1]))
    parts = []
    for r in range(0, w.shape[0], rows):
        found = _recover_rows(w[r:r + rows], bits, group_size)
        if found is None:
            return None
        parts.append(found)
    c = torch.cat([p[0] for p in parts])
    scale = torch.cat([p[1] for p in parts])
    d, half, levels = w.shape[-1], 2 ** (bits - 1), 2**bits - 1
    S = c.shape[-1]
    valid = torch.ones(c.shape[1:], dtype=torch.bool, device=c.device)
    if d % S:
        valid[-1, d % S:] = False
    big = torch.where(valid, c, torch.iinfo(c.dtype).min).amax(-1)
    small = torch.where(valid, c, torch.iinfo(c.dtype).max).amin(-1)
    if bool((small >= -half).all() and (big <= half - 1).all()):
        zero = torch.full_like(big, half)
    else:  # any zero keeping the group's codes in range; the midpoint code where it can
        zero = torch.minimum(torch.maximum(torch.full_like(big, half), -small), levels - big)
    u = ungroup((c + zero[..., None]) * valid, d)
    codes = Codes(u.to(torch.uint8), scale, zero.to(torch.int32), bits, group_size)
    if not bit_equal(dequantize(codes.codes, codes.scale, codes.zero, group_size, w.dtype), w):
        return None
    return codes


# ---------------------------------------------------------------------------------- packing


def pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[out, in]`` packed along ``in``: two per byte (low nibble = even column) for
    ``bits <= 4``, else one per byte."""
    if bits > 4:
        return codes.to(torch.uint8).contiguous()
    c = codes.to(torch.uint8)
    if c.shape[-1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack_bytes(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of ``pack_bytes``: uint8 codes ``[out, columns]``."""
    if bits > 4:
        return packed[..., :columns]
    return torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)[..., :columns]


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes ``[rows, cols]`` (< 2^bits) packed densely along ``cols`` into int32 words,
    ``bits`` per code, least significant bits first (compressed-tensors' ``pack_to_int32`` of the
    signed codes ``codes - 2^(bits-1)``, which adds that offset back before packing)."""
    rows, cols = codes.shape
    words = -(-cols * bits // 32)
    if 32 % bits == 0:  # whole codes per word (1, 2, 4, 8 bits)
        per = 32 // bits
        c = torch.nn.functional.pad(codes.to(torch.int64), (0, words * per - cols)).view(rows, words, per)
        value = (c << (bits * torch.arange(per, device=codes.device))).sum(-1)
    else:  # codes straddle words: through the bit stream
        shifts = torch.arange(bits, device=codes.device)
        stream = ((codes.to(torch.int64)[..., None] >> shifts) & 1).flatten(-2)  # [rows, cols * bits]
        stream = torch.nn.functional.pad(stream, (0, words * 32 - stream.shape[-1])).view(rows, words, 32)
        value = (stream << torch.arange(32, device=codes.device)).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of ``pack_int32``: uint8 codes ``[rows, cols]``."""
    rows = packed.shape[0]
    if 32 % bits == 0:
        per = 32 // bits
        c = (packed.to(torch.int64)[..., None] >> (bits * torch.arange(per, device=packed.device))) & (2**bits - 1)
        return c.flatten(-2)[:, :cols].to(torch.uint8)
    stream = ((packed.to(torch.int64)[..., None] >> torch.arange(32, device=packed.device)) & 1).flatten(-2)
    stream = stream[:, :cols * bits].view(rows, cols, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1).to(torch.uint8)


def pack_int32_rows(codes: torch.Tensor, bits: int, chunk: int = 4096) -> torch.Tensor:
    """``pack_int32`` a few rows at a time (its bit-stream temporaries are 8 bytes per bit)."""
    return torch.cat([pack_int32(codes[i:i + chunk], bits) for i in range(0, codes.shape[0], chunk)])


def unpack_int32_rows(packed: torch.Tensor, bits: int, cols: int, chunk: int = 4096) -> torch.Tensor:
    return torch.cat([unpack_int32(packed[i:i + chunk], bits, cols) for i in range(0, packed.shape[0], chunk)])
