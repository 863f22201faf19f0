"""TMAS: trajectories are the sampler's own states, segments, quotas, the cached calibration set."""

import pytest
import torch

from qdlm_bench.methods.dllmquant import SEGMENT_BY, TMASOptions, tmas
from qdlm_bench.calibration import CalibSet
from qdlm_bench.diffusion import GenerationConfig, generate
from qdlm_bench.models.presets import random_model

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16], [17, 18, 19]]
LLADA_GEN = GenerationConfig(gen_length=16, steps=8, block_length=8)  # 2 blocks x 4 steps x 2 tokens
DREAM_GEN = GenerationConfig(gen_length=16, steps=8)


def prompt_set(prompts=PROMPTS) -> CalibSet:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return CalibSet(ids, torch.zeros_like(ids, dtype=torch.bool), torch.zeros(len(prompts)), attention_mask=attn)


@pytest.fixture(scope="module")
def llada():
    return random_model("tiny-llada").eval()


@pytest.fixture(scope="module")
def llada_traj(llada):
    return tmas.trajectories(llada, PROMPTS, LLADA_GEN, batch_size=4)


@pytest.mark.parametrize("shape,cfg", [("tiny-llada", LLADA_GEN), ("tiny-dream", DREAM_GEN)])
def test_snapshots_are_the_states_the_sampler_saw(shape, cfg):
    model = random_model(shape).eval()
    traj = tmas.trajectories(model, PROMPTS, cfg, batch_size=4)
    # the states after each step, recorded independently, prompt by prompt
    mask_id = model.config.mask_token_id
    for p, prompt in enumerate(PROMPTS):
        states = [torch.tensor(prompt + [mask_id] * cfg.gen_length)]
        final = generate(model, [prompt], cfg, on_step=lambda i, x: states.append(x[0].clone()))[0]
        assert traj.gen[p].tolist() == final
        states = states[:-1]  # the input of every pass: all masked, then each step's result but the last
        rows = traj.rows(torch.tensor([[p, c] for c in range(len(states))]), mask_id, pad_id=0)
        assert int(traj.passes[p].max()) == len(states)
        for c, state in enumerate(states):
            row = rows.input_ids[c][rows.attention_mask[c].bool()] if rows.attention_mask is not None else rows.input_ids[c]
            assert torch.equal(row, state), (p, c)
            assert rows.mask_ratio[c] == (state[len(prompt):] == mask_id).float().mean()
        assert torch.equal(rows.masked, rows.input_ids == mask_id)


def test_llada_segments_follow_the_schedule(llada_traj):
    # 8 passes per prompt, 2 tokens decoded per pass, 4 passes per block
    assert torch.equal(torch.bincount(llada_traj.passes[0], minlength=9)[1:], torch.full((8,), 2))
    assert (llada_traj.passes[:, :8] <= 4).all() and (llada_traj.passes[:, 8:] > 4).all()
    snaps = llada_traj.snapshots()
    assert len(snaps) == 8 * len(PROMPTS)
    c = snaps[:, 1]
    assert torch.equal(llada_traj.segments(4, "mask_ratio"), c // 2)  # masked 16 - 2c: u = c / 8
    assert torch.equal(llada_traj.segments(4, "global_step"), c // 2)
    assert torch.equal(llada_traj.segments(4, "block_step"), c % 4)
    assert torch.equal(llada_traj.segments(2, "block_step"), (c % 4) // 2)


def test_quotas():
    assert tmas.quotas(128, (0.3, 0.2, 0.2, 0.3)) == [38, 26, 26, 38]
    assert tmas.quotas(10, (0.3, 0.2, 0.2, 0.3)) == [3, 2, 2, 3]
    assert tmas.quotas(7, (0.5, 0.5)) in ([4, 3], [3, 4]) and sum(tmas.quotas(7, (0.25,) * 4)) == 7


@pytest.mark.parametrize("segment_by", SEGMENT_BY)
def test_draw_meets_quotas_from_every_segment(llada_traj, segment_by):
    seg = llada_traj.segments(4, segment_by)
    gen = torch.Generator().manual_seed(0)
    idx = tmas.draw(seg, 20, (0.3, 0.2, 0.2, 0.3), gen)
    assert torch.bincount(seg[idx], minlength=4).tolist() == [6, 4, 4, 6]
    assert len(set(idx.tolist())) == 20  # pools of 12 per segment: no snapshot twice
    big = tmas.draw(seg, 64, (0.3, 0.2, 0.2, 0.3), gen)  # quotas above the pools: each pool exhausted first
    for k, q in enumerate(tmas.quotas(64, (0.3, 0.2, 0.2, 0.3))):
        drawn = big[seg[big] == k]
        assert len(drawn) == q and len(set(drawn.tolist())) == min(q, int((seg == k).sum()))
    with pytest.raises(ValueError, match="segment 4 of 5 holds no snapshot"):
        tmas.draw(seg, 20, (0.2,) * 5, gen)


def test_build_rows_quotas_confidences_and_cache(llada, tmp_path, monkeypatch):
    cfg = TMASOptions(n_samples=20, generation={"gen_length": 16, "steps": 8, "block_length": 8})
    calib = tmas.build(llada, prompt_set(), cfg, batch_size=4, cache_dir=tmp_path)
    assert len(calib) == 20 and calib.confidence.shape == calib.input_ids.shape
    real = calib.attention_mask.bool()
    assert torch.equal(calib.masked, (calib.input_ids == llada.config.mask_token_id) & real)
    # mask_ratio segments: ratio in ((3 - k) / 4, (4 - k) / 4] for segment k, drawn 6, 4, 4, 6
    seg = (4 * (1 - calib.mask_ratio)).floor().long()
    assert torch.bincount(seg, minlength=4).tolist() == [6, 4, 4, 6]
    conf = calib.confidence[real]
    assert ((conf > 0) & (conf <= 1)).all()
    monkeypatch.setattr(tmas, "trajectories", lambda *a, **k: pytest.fail("not cached"))
    again = tmas.build(llada, prompt_set(), cfg, batch_size=4, cache_dir=tmp_path)
    assert again.key == calib.key and all(torch.equal(t, again.tensors()[n]) for n, t in calib.tensors().items())


def test_uniform_and_text_sampling(llada):
    gen = {"gen_length": 16, "steps": 8, "block_length": 8}
    uniform = tmas.build(llada, prompt_set(), TMASOptions(n_samples=30, sampling="uniform", generation=gen),
                         cache_dir=None)
    assert len(uniform) == 30 and uniform.masked.any(1).all()
    text = tmas.build(llada, prompt_set(), TMASOptions(n_samples=6, sampling="text", generation=gen),
                      cache_dir=None)
    assert not text.masked.any() and torch.equal(text.mask_ratio, torch.zeros(6))
    assert sorted(r[a.bool()].tolist()[0] for r, a in zip(text.input_ids, text.attention_mask)) == \
        sorted(p[0] for p in PROMPTS)  # every prompt's finished sequence once


def test_errors_are_clear(llada):
    with pytest.raises(ValueError, match="sum to 1"):
        TMASOptions(proportions=(0.5, 0.6))
    with pytest.raises(ValueError, match="segment_by"):
        TMASOptions(segment_by="time")
    with pytest.raises(ValueError, match="tmas generation.*valid keys"):
        TMASOptions(generation={"length": 3})
    masked = prompt_set()
    masked.masked[0, -1] = True
    with pytest.raises(ValueError, match="masking=none"):
        tmas.build(llada, masked, TMASOptions(), cache_dir=None)
