"""Padded batches run packed (``PackedRows``: the real tokens only, variable-length attention): the
cuts, and the forward and the sampler equal to the masked-SDPA path. On a CPU the flash kernel is
replaced by per-piece SDPA (what ``varlen_attn`` computes), so the packing around it is what is
tested; on a GPU, the kernel."""

import pytest
import torch
import torch.nn.functional as F

from qdlm_bench.diffusion import GenerationConfig, generate
from qdlm_bench.models import transformer
from qdlm_bench.models.presets import random_model
from qdlm_bench.models.transformer import PackedRows, packed_rows, varlen_supported


def reference_varlen(q, k, v, rows: PackedRows, gqa: bool):
    """Attention within each piece ``[cu[i], cu[i+1])`` of the flattened tokens, by plain SDPA."""
    cu = rows.cu_seqlens.tolist()
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1], cu[1:]):
        piece = [t[a:b].transpose(0, 1)[None] for t in (q, k, v)]
        out[a:b] = F.scaled_dot_product_attention(*piece, enable_gqa=gqa)[0].transpose(0, 1)
    return out


@pytest.fixture
def reference_kernel(monkeypatch):
    """Packs rows on this CPU with ``reference_varlen`` as the kernel; counts its calls."""
    calls = []

    def kernel(*args):
        calls.append(args[3])
        return reference_varlen(*args)

    monkeypatch.setattr(transformer, "_varlen_attn", kernel)
    monkeypatch.setattr(transformer, "varlen_supported", lambda *a: True)
    return calls


def test_packed_rows_cuts_the_real_tokens_by_row():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 1]])
    rows = packed_rows(mask)
    assert rows.cu_seqlens.dtype == torch.int32 and rows.max_len == 5
    # 3 real tokens, 5, none (no empty piece), 2 (a hole: the row's real tokens, in order)
    assert rows.cu_seqlens.tolist() == [0, 3, 8, 10]


@pytest.mark.parametrize("shape", ["tiny-llada", "tiny-dream"])  # Dream: GQA and shifted logits
def test_packed_forward_equals_masked_sdpa(shape, monkeypatch, reference_kernel):
    model = random_model(shape, seed=3).eval()
    ids = torch.randint(2, 120, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :1] = 0
    mask[1, 4] = 0  # a hole: positions count real tokens only, on both paths
    with torch.no_grad():
        packed = model(ids, attention_mask=mask)
        assert len(reference_kernel) == model.config.n_layers  # the packed path ran, every block
        assert reference_kernel[0].cu_seqlens.tolist() == [0, 7, 18, 29]
        assert not model.hidden_states(ids, mask)[~mask.bool()].any()  # padded positions: zeros
        monkeypatch.setattr(transformer, "varlen_supported", lambda *a: False)
        masked = model(ids, attention_mask=mask)
    assert len(reference_kernel) == 2 * model.config.n_layers
    real = mask.bool()
    if model.config.shift_logits:  # a row's first real logits come from the pad column before it
        real[:, 1:] &= mask.bool()[:, :-1]
    torch.testing.assert_close(packed[real], masked[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed[0, 6], packed[0, 7])


def test_sampler_tokens_are_unchanged_by_packing(monkeypatch, reference_kernel):
    model = random_model("tiny-llada", seed=1).eval()
    prompts = [[1, 5, 9, 3, 4], [7, 8, 2], [3, 11, 40, 2, 9, 9, 1, 6, 30]]
    cfg = GenerationConfig(gen_length=16, steps=16, block_length=8)
    packed = generate(model, prompts, cfg, batch_size=3)
    assert reference_kernel  # the padded batch went through the packed path
    monkeypatch.setattr(transformer, "varlen_supported", lambda *a: False)
    assert generate(model, prompts, cfg, batch_size=3) == packed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash varlen kernel needs a CUDA GPU")
def test_flash_varlen_kernel_matches_masked_sdpa_on_gpu():
    model = random_model("tiny-llada", dtype=torch.bfloat16, device="cuda", seed=3).eval()
    assert varlen_supported(model.device, model.dtype, model.config.head_dim, False)
    ids = torch.randint(2, 120, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    mask = (torch.arange(64, device="cuda")[None] >= torch.tensor([[0], [9], [30], [63]], device="cuda")).long()
    with torch.no_grad():
        packed = model(ids, attention_mask=mask)
        masked = model.lm_head(model.norm(_masked_hidden(model, ids, mask)))
    real = mask.bool()
    torch.testing.assert_close(packed[real].float(), masked[real].float(), rtol=0.05, atol=0.05)


def _masked_hidden(model, ids, mask):
    """The blocks with the boolean mask (``block_context``'s, as calibration runs them)."""
    cos, sin, m = model.block_context(ids, mask)
    x = model.embed(ids)
    for block in model.blocks:
        x = block(x, cos, sin, m)
    return x


def test_layer_error_grams_read_the_padded_layout(monkeypatch, reference_kernel):
    """Hooks that weight linear inputs by the [B, L] mask run ``unpacked``: the same Gram matrices
    as without packing (packed, the inputs would be [1, T, d] against a [B, L] mask)."""
    from qdlm_bench.calibration import CalibSet
    from qdlm_bench.layer_error import gram_matrices

    model = random_model("tiny-llada", seed=3).eval()
    ids = torch.randint(2, 120, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(10)[None] >= torch.tensor([[0], [3], [6], [1]])).long()
    calib = CalibSet(input_ids=ids, masked=torch.zeros_like(ids, dtype=torch.bool),
                     mask_ratio=torch.zeros(4), attention_mask=mask)
    grams = gram_matrices(model, calib, batch_size=4)
    assert not reference_kernel and model.packs_rows()  # unpacked inside, packing back on after
    monkeypatch.setattr(transformer, "varlen_supported", lambda *a: False)
    for name, gram in gram_matrices(model, calib, batch_size=4).items():
        torch.testing.assert_close(grams[name], gram)
