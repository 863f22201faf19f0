"""IA-AQ (DLLMQuant's Interaction-Aware Activation Quantization): a static per-head range scale of V.

V ``[B, H_kv, L, hd]`` is quantized per token and head, asymmetrically, as the KV quantizer does,
but with the step ``s = alpha_h (V_max - V_min) / (Q_max - Q_min)`` (min/max live, per token;
``alpha_h`` static, per layer and KV head). ``alpha_h`` minimizes ``||A (Q_s(V) - V)||_F^2`` over a
grid in ``[alpha_min, alpha_max]``, where ``A`` are the bidirectional attention probabilities of
the heads reading V on the calibration set: an error in a value that many queries attend to
counts more. Blocks are calibrated in order on cached block inputs; each block's V quantizer is
installed before its outputs feed the next block. The attention operands (Q and K after RoPE
and any rotation/quantization, the mask) are read from the block's own
``scaled_dot_product_attention`` call, so ``A`` is exactly what the block computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from qdlm_bench.quant.apply import install_kv_quantizers
from qdlm_bench.quant.quantizer import fake_quant
from qdlm_bench.quant.spec import QuantSpec
from qdlm_bench.quant.walk import Batches, block_inputs, run_block

from . import IAAQOptions


def attention_probs(q: torch.Tensor, k: torch.Tensor, attn_mask=None, scale: float | None = None,
                    enable_gqa: bool = False) -> torch.Tensor:
    """``softmax(q k^T * scale + mask)`` ``[B, H, L, L]`` in float32, as ``scaled_dot_product_attention``."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q.float() @ k.float().transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -torch.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(-1)


def head_losses(v: torch.Tensor, attn: torch.Tensor, bits: int, alphas: torch.Tensor,
                query_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``[len(alphas), H_kv]``: ``sum_b sum_{heads reading h} sum_l w_bl ||(A (Q_alpha(V) - V))_l||^2`` for
    V ``[B, H_kv, L, hd]``, A ``[B, H, L, L]`` (query heads grouped over KV heads) and query weights ``[B, L]``."""
    group = attn.shape[1] // v.shape[1]
    out = []
    for a in alphas.tolist():
        err = (fake_quant(v, bits, False, None, a).float() - v.float()).repeat_interleave(group, dim=1)
        per_query = (attn @ err).square().sum(-1)  # [B, H, L]
        if query_weights is not None:
            per_query = per_query * query_weights[:, None, :]
        out.append(per_query.sum((0, 2)).view(v.shape[1], group).sum(1))
    return torch.stack(out)


class _AttentionProbe(TorchFunctionMode):
    """Inside ``with``: keeps the arguments of each ``scaled_dot_product_attention`` call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append((args, kwargs))
        return func(*args, **kwargs)


def _block_losses(block: nn.Module, x: torch.Tensor, ctx, w, bits: int, alphas: torch.Tensor) -> torch.Tensor:
    """IA-AQ losses of one batch through ``block`` (whose V quantizer is off)."""
    with _AttentionProbe() as probe:
        block(x, *ctx)
    ((q, k, v, *rest), kw), = probe.calls
    mask = rest[0] if rest else kw.get("attn_mask")
    attn = attention_probs(q, k, mask, kw.get("scale"), kw.get("enable_gqa", False))
    return head_losses(v, attn, bits, alphas, w)


@torch.no_grad()
def calibrate(model: nn.Module, calib, spec: QuantSpec, cfg: IAAQOptions | None = None, batch_size: int = 8) -> dict:
    """Search every block's V alphas at ``spec.kv_bits``, block by block on ``calib`` (``input_ids``,
    optional ``attention_mask``; padded queries do not count), installing each block's K/V
    quantizers with its alphas (``quant.install_kv_quantizers``) before its outputs feed the next
    block. Returns ``{"alphas": [per block [H_kv]], "losses": [per block [len(grid), H_kv]]}``."""
    alphas = (cfg or IAAQOptions()).grid()
    batches = Batches(model, calib, batch_size, None)
    xs = block_inputs(model, calib.input_ids, batch_size)
    found, losses = [], []
    for block in model.blocks:
        block.v_quant = nn.Identity()  # V in full precision while its errors are measured
        loss = sum(_block_losses(block, xs[s], ctx, w, spec.kv_bits, alphas) for s, ctx, w in batches)
        best = alphas[loss.argmin(0)]
        install_kv_quantizers(block, spec, best)
        found.append(best)
        losses.append(loss)
        xs = run_block(block, xs, batches)
    return {"alphas": found, "losses": losses}
