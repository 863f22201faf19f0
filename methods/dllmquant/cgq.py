"""CGQ (DLLMQuant's Certainty-Guided Quantization): per-token weights of the calibration statistics.

``g_t = ind_t + sqrt(sc_t)`` with ``ind_t = masked`` (1.0) for masked tokens and ``unmasked`` (0.7)
for the others, and ``sc_t`` the FP model's confidence at t (``calibration.confidences``: the largest
softmax probability at masked positions; at unmasked ones the probability of the present token,
or 0 with ``unmasked_conf="zero"``). The weights ``w_t = g_t^2``, normalized to mean 1 over real
tokens (padding gets 0), enter GPTQ's Hessian ``H = sum_t w_t x_t x_t^T`` and AWQ's search losses
through ``CalibSet.token_weights`` and the shared block walk.
"""

from __future__ import annotations

import torch

from . import CGQOptions

def token_weights(calib, cfg: CGQOptions | None = None) -> torch.Tensor:
    """``w_t = g_t^2`` [N, L] for a CalibSet with ``confidence``, mean 1 over its real tokens."""
    if calib.confidence is None:
        raise ValueError("CGQ needs the FP model's confidences (calibration.confidences) on the calibration set")
    cfg = cfg or CGQOptions()
    sc = calib.confidence.float()
    if cfg.unmasked_conf == "zero":
        sc = sc.masked_fill(~calib.masked, 0.0)
    ind = torch.where(calib.masked, cfg.masked, cfg.unmasked)
    w = (ind + sc.clamp(min=0).sqrt()).square()
    real = torch.ones_like(w) if calib.attention_mask is None else calib.attention_mask.float()
    w = w * real
    return w * real.sum() / w.sum().clamp(min=1e-12)
