"""layer_error: per-layer output errors computed from Gram matrices equal the direct ones."""

from __future__ import annotations

import json

import torch

from qdlm_bench import layer_error
from qdlm_bench.calibration import CalibSet
from qdlm_bench.models import DiffusionLM, DLLMConfig


def test_relative_error_from_the_gram_matrix_equals_the_direct_one():
    X, W = torch.randn(50, 16), torch.randn(8, 16)
    Q = W + 0.1 * torch.randn_like(W)
    direct = (X @ (Q - W).T).norm() / (X @ W.T).norm()
    assert abs(layer_error.relative_error(W, Q, X.T @ X) - float(direct)) < 1e-5


def test_gram_matrices_leave_padding_out():
    cfg = DLLMConfig(family="llada", vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4,
                     d_ff=64, mask_token_id=63, eos_token_id=62, pad_token_id=62)
    model = DiffusionLM(cfg).eval()
    ids = torch.randint(0, 60, (2, 10))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    padded = CalibSet(ids, torch.zeros_like(ids, dtype=torch.bool), torch.zeros(2), attention_mask=am)
    grams = layer_error.gram_matrices(model, padded)
    xs = []
    h = model.blocks[0].q_proj.register_forward_hook(lambda m, a, o: xs.append(a[0]))
    model(ids[:1])
    model(ids[1:, 4:])
    h.remove()
    x = torch.cat([xs[0][0], xs[1][0]])
    gram, direct = grams["blocks.0.q_proj"], x.T @ x  # equal up to scale (which the error ratio cancels)
    assert torch.allclose(gram / gram.trace(), direct / direct.trace(), atol=1e-5)


def test_cli_reports_both_sets(tmp_path):
    assert layer_error.main(["model=tiny_random_llada", "bits=w3a16g32", "calib.n_samples=4", "calib.seqlen=32",
                             "heldout=mini_ppl", f"out={tmp_path}"]) == 0
    result = json.loads((tmp_path / "layer_error.json").read_text())
    assert len(result["layers"]) == 14 and result["heldout"] == "mini_ppl"
    assert result["mean"]["gptq_fit"] < result["mean"]["rtn_fit"]  # GPTQ's own objective
