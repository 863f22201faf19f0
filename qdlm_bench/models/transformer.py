"""A bidirectional transformer dLLM in plain PyTorch: RMSNorm, RoPE, GQA, SwiGLU, SDPA.

Every block uses the canonical names ``attn_norm q_proj k_proj v_proj o_proj mlp_norm
gate_proj up_proj down_proj`` whatever the checkpoint family, so quantization methods address
layers one way. ``k_quant`` / ``v_quant`` are identity hooks on K (after RoPE) and V that
activation-quantization methods may replace; ``qk_rotate`` (identity) acts on Q and K after RoPE.
"""

from __future__ import annotations

import functools
import inspect
import logging
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import DLLMConfig

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape [B, 1, L, head_dim] for integer positions [B, L] (computed in fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, L] of a padded batch: each real token's index among its row's real tokens
    (so a padded row computes what the unpadded one does); padding at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PackedRows(NamedTuple):
    """The real tokens of a padded batch as one row of variable-length sequences for flash
    attention: ``cu_seqlens`` (int32) marks where each batch row's tokens start in it, so a token
    attends to its own row's tokens only, with no mask and no padding."""
    cu_seqlens: torch.Tensor
    max_len: int


def packed_rows(attention_mask: torch.Tensor) -> PackedRows:
    """``PackedRows`` of the real tokens (1 in the [B, L] mask) of each row, in order."""
    lengths = attention_mask.bool().sum(-1)
    cuts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    return PackedRows(torch.unique_consecutive(cuts).to(torch.int32), attention_mask.shape[1])


def _varlen_attn(q, k, v, rows: PackedRows, gqa: bool) -> torch.Tensor:
    """Flash attention over ``rows`` (``torch.nn.attention.varlen``): [T, H, hd] in, [T, H, hd] out."""
    from torch.nn.attention.varlen import varlen_attn

    extra = {"enable_gqa": True} if gqa else {}
    return varlen_attn(q, k, v, rows.cu_seqlens, rows.cu_seqlens, rows.max_len, rows.max_len, **extra)


@functools.cache
def varlen_supported(device: torch.device, dtype: torch.dtype, head_dim: int, gqa: bool) -> bool:
    """Whether ``_varlen_attn`` runs here: a CUDA device, 16-bit floats, head_dim <= 256, GQA only
    where this torch's ``varlen_attn`` takes ``enable_gqa``, and a probe call that succeeds."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or head_dim > 256:
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    if gqa and "enable_gqa" not in inspect.signature(varlen_attn).parameters:
        return False
    try:
        t = torch.zeros(4, 2 if gqa else 1, head_dim, device=device, dtype=dtype)
        _varlen_attn(t, t[:, :1] if gqa else t, t[:, :1] if gqa else t,
                     PackedRows(torch.tensor([0, 1, 4], device=device, dtype=torch.int32), 3), gqa)
    except Exception as err:  # noqa: BLE001 - a kernel this build lacks: the masked SDPA path stays
        log.warning("variable-length flash attention unavailable here (%s); padded batches use masked SDPA", err)
        return False
    return True


class LayerKV:
    """One block's K/V cache ``[B, H_kv, L, hd]`` (after RoPE, ``qk_rotate`` and the K/V quantizers:
    what the model, quantized or not, computes). A full forward (``fresh`` None) stores its K/V; a
    cached one computes only the columns ``fresh`` and attends to the stored K/V with those columns
    replaced by their fresh values (the cache itself is left as it was)."""

    def __init__(self):
        self.k = self.v = None
        self.fresh: slice | None = None

    def attend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fresh is None:
            self.k, self.v = k, v
            return k, v
        a, b = self.fresh.start, self.fresh.stop
        return (torch.cat([self.k[:, :, :a], k, self.k[:, :, b:]], 2),
                torch.cat([self.v[:, :, :a], v, self.v[:, :, b:]], 2))


class KVCache:
    """Every block's ``LayerKV``: ``DiffusionLM.forward(..., cache=KVCache(n_layers))`` fills it,
    ``forward(..., cache=cache, fresh=slice(a, b))`` reuses it for all columns outside ``[a, b)``."""

    def __init__(self, n_layers: int):
        self.layers = [LayerKV() for _ in range(n_layers)]

    @property
    def filled(self) -> bool:
        return self.layers[0].k is not None

    def use(self, fresh: slice | None) -> list[LayerKV]:
        if fresh is not None and not self.filled:
            raise ValueError("a cached forward (fresh=...) needs a cache filled by a full forward first")
        for layer in self.layers:
            layer.fresh = fresh
        return self.layers


class Block(nn.Module):
    def __init__(self, cfg: DLLMConfig):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, d, bias=False)
        self.qk_rotate = nn.Identity()
        self.k_quant = nn.Identity()
        self.v_quant = nn.Identity()
        self.mlp_norm = RMSNorm(d, cfg.norm_eps)
        self.gate_proj = nn.Linear(d, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(d, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, d, bias=False)

    def forward(self, x, cos, sin, attn_mask: torch.Tensor | PackedRows | None, kv: LayerKV | None = None):
        b, n, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.qk_rotate(apply_rope(q, cos, sin)), self.k_quant(self.qk_rotate(apply_rope(k, cos, sin)))
        v = self.v_quant(v)
        if kv is not None:
            k, v = kv.attend(k, v)
        gqa = self.n_heads != self.n_kv_heads
        if isinstance(attn_mask, PackedRows):
            flat = [t.transpose(1, 2).reshape(b * n, -1, self.head_dim) for t in (q, k, v)]
            a = _varlen_attn(*flat, attn_mask, gqa).view(b, n, -1)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
            a = a.transpose(1, 2).reshape(b, n, -1)
        x = x + self.o_proj(a)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DiffusionLM(nn.Module):
    """``forward(input_ids, attention_mask=None, positions=None) -> logits`` aligned to positions.

    ``attention_mask`` [B, L] (1 = real token, 0 = padding) hides padded keys and shifts
    RoPE positions so a left-padded row computes exactly what the unpadded row would.
    For Dream (``shift_logits``), the returned logits at position i are the network's
    outputs at i-1 (position 0 repeats its own), so callers never special-case families.
    """

    def __init__(self, cfg: DLLMConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    packing = True  # ``unpacked(model)`` turns it off

    def packs_rows(self) -> bool:
        cfg = self.config
        return self.packing and varlen_supported(self.device, self.dtype, cfg.head_dim, cfg.n_heads != cfg.n_kv_heads)

    def block_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """RoPE tables and attention mask shared by every block (for block-wise methods too)."""
        b, n = input_ids.shape
        if attention_mask is None:
            return (*self.rope(torch.arange(n, device=input_ids.device).expand(b, n)), None)
        am = attention_mask.bool()
        # keys that are padding are hidden; padded query rows still see themselves (no NaN)
        mask = am[:, None, None, :] | torch.eye(n, dtype=torch.bool, device=am.device)
        return (*self.rope(token_positions(am)), mask)

    def rope(self, positions: torch.Tensor):
        """cos/sin tables [B, 1, L, head_dim] of integer positions [B, L]."""
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, self.dtype)

    def hidden_states(self, input_ids, attention_mask=None, cache: KVCache | None = None,
                      fresh: slice | None = None) -> torch.Tensor:
        """Final hidden states [B, L, d]; with ``cache`` and ``fresh``, of the columns ``fresh`` only.
        A padded batch without a cache runs packed where variable-length flash attention exists
        (``varlen_supported``; ``_packed_hidden_states``), with masked SDPA otherwise."""
        if attention_mask is not None and cache is None and self.packs_rows():
            return self._packed_hidden_states(input_ids, attention_mask.bool())
        cos, sin, mask = self.block_context(input_ids, attention_mask)
        if fresh is not None:
            input_ids, cos, sin = input_ids[:, fresh], cos[:, :, fresh], sin[:, :, fresh]
            mask = None if mask is None else mask[:, :, fresh]
        x = self.embed(input_ids)
        if cache is None:
            for block in self.blocks:
                x = block(x, cos, sin, mask)
        else:
            for block, kv in zip(self.blocks, cache.use(fresh)):
                x = block(x, cos, sin, mask, kv)
        return self.norm(x)

    def _packed_hidden_states(self, input_ids, keep) -> torch.Tensor:
        """The real tokens (``keep`` [B, L]) of all rows as one row through the blocks, each row
        attending to itself (``PackedRows``): no FLOP on padding. Padded positions come back zero."""
        rows = packed_rows(keep)
        cos, sin = self.rope(token_positions(keep)[keep][None])
        x = self.embed(input_ids[keep])[None]
        for block in self.blocks:
            x = block(x, cos, sin, rows)
        h = self.norm(x)[0]
        return h.new_zeros(*keep.shape, h.shape[-1]).index_put_((keep,), h)

    def forward(self, input_ids, attention_mask=None, positions: slice | torch.Tensor | None = None,
                cache: KVCache | None = None, fresh: slice | None = None) -> torch.Tensor:
        """Logits [B, L, V]; with ``positions``, only those (the LM head runs on them only): a slice
        of columns gives [B, n, V], a boolean [B, L] mask gives ``logits[positions]``, [N, V].

        ``cache`` (a ``KVCache``): without ``fresh``, the forward is the plain one and stores every
        block's K/V; with ``fresh = slice(a, b)`` (``a`` >= 1 for Dream, whose logits at ``a`` come
        from column ``a - 1``), only those columns run, against the cached K/V of the others, and
        ``positions`` (required) must lie in ``[a + shift, b)``.
        """
        if fresh is not None and (cache is None or not isinstance(positions, slice)):
            raise ValueError("fresh=... needs a cache and the positions (a slice) whose logits to return")
        h = self.hidden_states(input_ids, attention_mask, cache, fresh)
        if self.config.shift_logits:
            h = torch.cat([h[:, :1], h[:, :-1]], dim=1)
        if fresh is not None:
            shift = int(self.config.shift_logits)
            if positions.start < fresh.start + shift or positions.stop > fresh.stop:
                raise ValueError(f"positions {positions} outside the fresh columns {fresh} (shift {shift})")
            positions = slice(positions.start - fresh.start, positions.stop - fresh.start)
        if isinstance(positions, torch.Tensor):
            return self.lm_head(h[positions])
        return self.lm_head(h if positions is None else h[:, positions])


@contextmanager
def unpacked(model: DiffusionLM):
    """Inside ``with``, padded batches keep their [B, L] layout in the blocks (masked SDPA), for
    hooks that read per-token linear inputs against the attention mask."""
    previous, model.packing = model.packing, False
    try:
        yield model
    finally:
        model.packing = previous


def compile_blocks(model: DiffusionLM) -> DiffusionLM:
    """torch.compile each block in place: one graph shared by all blocks (norms, RoPE and SwiGLU
    fused around the matmuls); the model keeps its interface and state dict."""
    for block in model.blocks:
        block.compile()
    return model
