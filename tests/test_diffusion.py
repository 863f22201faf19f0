"""Samplers and ELBO likelihood on tiny random models (fp32, CPU)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qdlm_bench.diffusion import (
    GenerationConfig,
    generate,
    loglikelihood,
    mc_masks,
    num_transfer_tokens,
    rolling_loglikelihood,
)
from qdlm_bench.models import DLLMConfig, DiffusionLM

MASK = 63
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]


def tiny(family: str, seed: int = 0) -> DiffusionLM:
    torch.manual_seed(seed)
    dream = family == "dream"
    cfg = DLLMConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                     n_kv_heads=2 if dream else 4, d_ff=64, qkv_bias=dream, shift_logits=dream,
                     mask_token_id=MASK, eos_token_id=62, pad_token_id=62)
    return DiffusionLM(cfg).eval()


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request):
    return tiny(request.param)


class Recorder(nn.Module):
    """Wraps a model and keeps a copy of every input it is called with."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config, self.calls = inner, inner.config, []

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, attention_mask=None, positions=None):
        self.calls.append(input_ids.clone())
        return self.inner(input_ids, attention_mask=attention_mask, positions=positions)


class Oracle(nn.Module):
    """Puts almost all probability on one token whatever the input."""

    def __init__(self, token: int, vocab: int = 16):
        super().__init__()
        self.token, self.vocab = token, vocab
        self.config = SimpleNamespace(family="llada", mask_token_id=vocab - 1, pad_token_id=vocab - 2,
                                      eos_token_id=vocab - 2)
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, positions=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token] = 8.0
        return logits if positions is None else logits[:, positions]


SAMPLER_CASES = [
    dict(sampler="llada", remasking=r, temperature=t)
    for r in ("low_confidence", "random") for t in (0.0, 1.0)
] + [
    dict(sampler="dream", alg=a, temperature=t) for a in ("entropy", "maskgit_plus", "topk_margin", "origin")
    for t in (0.0, 0.8)
] + [dict(sampler="dream", alg="maskgit_plus", temperature=1.0, alg_temp=0.5, top_p=0.9, top_k=8)]


@pytest.mark.parametrize("case", SAMPLER_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_mask_is_filled(model, case):
    cfg = GenerationConfig(gen_length=8, steps=4, block_length=4, **case)
    out = generate(model, PROMPTS, cfg, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert [len(o) for o in out] == [8] * len(PROMPTS)
    assert all(MASK not in o for o in out)


def test_num_transfer_tokens_splits_evenly():
    got = num_transfer_tokens(torch.tensor([4, 5, 2]), 3)
    assert got.tolist() == [[2, 1, 1], [2, 2, 1], [1, 1, 0]]


def test_llada_follows_schedule_block_by_block():
    rec = Recorder(tiny("llada"))
    prompt = [5, 6, 7]
    generate(rec, [prompt], GenerationConfig(gen_length=8, steps=6, block_length=4, sampler="llada"))
    gens = [c[0, len(prompt):] for c in rec.calls]
    # 3 steps per block of 4 tokens: unmask 2, 1, 1
    assert [int((g == MASK).sum()) for g in gens] == [8, 6, 5, 4, 2, 1]
    for j, g in enumerate(gens):
        block = j // 3
        assert (g[(block + 1) * 4:] == MASK).all(), "a later block was touched"
        assert (g[: block * 4] != MASK).all(), "an earlier block was left masked"
    assert all(c[0, : len(prompt)].tolist() == prompt for c in rec.calls)


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin"])
def test_dream_follows_timestep_schedule(alg):
    rec = Recorder(tiny("dream"))
    gen_length, steps, eps = 10, 4, 1e-3
    cfg = GenerationConfig(gen_length=gen_length, steps=steps, sampler="dream", alg=alg, eps=eps)
    generate(rec, [[5, 6]], cfg)
    ts = torch.linspace(1, eps, steps + 1)
    expected, n = [], gen_length
    for i in range(steps):
        expected.append(n)
        n -= n if i == steps - 1 else int(n * (1 - ts[i + 1] / ts[i]))
    assert [int((c[0, 2:] == MASK).sum()) for c in rec.calls] == expected


BATCH_CASES = [dict(sampler="llada"), dict(sampler="llada", cfg_scale=1.5),
               dict(sampler="dream", alg="entropy"), dict(sampler="dream", alg="topk_margin")]


@pytest.mark.parametrize("case", BATCH_CASES)
def test_batched_generation_equals_one_at_a_time(model, case):
    cfg = GenerationConfig(gen_length=8, steps=8, block_length=4, **case)
    batched = generate(model, PROMPTS, cfg, batch_size=4)
    alone = [generate(model, [p], cfg, batch_size=1)[0] for p in PROMPTS]
    assert batched == alone


def test_prompt_tokens_never_change(model):
    rec = Recorder(model)
    cfg = GenerationConfig(gen_length=8, steps=8, block_length=8, temperature=1.0)
    generate(rec, PROMPTS, cfg, batch_size=4, generator=torch.Generator().manual_seed(1))
    start = max(map(len, PROMPTS))
    first = rec.calls[0][:, :start]
    assert all(torch.equal(c[:, :start], first) for c in rec.calls)
    assert {tuple(r[r != 62].tolist()) for r in first} == {tuple(p) for p in PROMPTS}


def test_cfg_runs_and_changes_the_output():
    model = tiny("llada")
    base = GenerationConfig(gen_length=16, steps=16, block_length=16, sampler="llada")
    guided = GenerationConfig(gen_length=16, steps=16, block_length=16, sampler="llada", cfg_scale=3.0)
    assert generate(model, PROMPTS, base) != generate(model, PROMPTS, guided)


@pytest.mark.parametrize("kwargs, match", [
    (dict(gen_length=10, block_length=4), "block_length"),
    (dict(gen_length=8, block_length=4, steps=3), "steps"),
])
def test_llada_rejects_bad_block_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny("llada"), [[1]], GenerationConfig(sampler="llada", **kwargs))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="alg"):
        GenerationConfig(alg="greedy")
    with pytest.raises(ValueError, match="prompt"):
        generate(tiny("dream"), [[]], GenerationConfig(gen_length=4, steps=4))
    with pytest.raises(ValueError, match="empty target"):
        loglikelihood(tiny("llada"), [([1, 2], [])])


def test_mc_masks_are_stratified():
    masks = mc_masks(10, 10, torch.Generator().manual_seed(3))
    assert sorted(masks.sum(1).tolist()) == list(range(1, 11))


REQUESTS = [([1, 2, 3], [4, 5, 6, 7]), ([], [8, 9]), ([10] * 9, [11]), ([12, 13], [14, 15, 16, 17, 18, 19])]


def test_loglikelihood_is_deterministic_finite_negative(model):
    a = loglikelihood(model, REQUESTS, mc_num=8, batch_size=8, seed=0)
    assert a == loglikelihood(model, REQUESTS, mc_num=8, batch_size=8, seed=0)
    assert a != loglikelihood(model, REQUESTS, mc_num=8, batch_size=8, seed=1)
    assert all(torch.isfinite(torch.tensor(a))) and max(a) < 0


def test_batched_loglikelihood_equals_each_alone(model):
    batched = loglikelihood(model, REQUESTS, mc_num=6, batch_size=5, seed=7)
    alone = [loglikelihood(model, [r], mc_num=6, batch_size=2, seed=7)[0] for r in REQUESTS]
    assert batched == pytest.approx(alone, rel=1e-5)
    reordered = loglikelihood(model, REQUESTS[::-1], mc_num=6, batch_size=32, seed=7)
    assert reordered[::-1] == pytest.approx(batched, rel=1e-5)


def test_one_token_elbo_is_the_exact_log_prob(model):
    prefix, target = [3, 1, 4, 1, 5], 9
    exact = model(torch.tensor([prefix + [MASK]]))[0, -1].log_softmax(-1)[target].item()
    (elbo,) = loglikelihood(model, [(prefix, [target])], mc_num=16, batch_size=16)
    assert elbo == pytest.approx(exact, abs=1e-5)


def test_oracle_prefers_its_token():
    oracle = Oracle(token=3)
    right, wrong = loglikelihood(oracle, [([1, 2], [3, 3, 3]), ([1, 2], [3, 4, 3])], mc_num=16)
    assert right > wrong
    assert right == pytest.approx(3 * torch.tensor([8.0] + [0.0] * 15).log_softmax(0)[0].item(), rel=1e-6)


def test_rolling_loglikelihood_sums_window_elbos():
    model = tiny("llada")
    tokens = list(range(20))
    windows = [([], tokens[:8]), ([], tokens[8:16]), ([], tokens[16:])]
    total = rolling_loglikelihood(model, tokens, max_length=8, mc_num=4, seed=2)
    assert total == pytest.approx(sum(loglikelihood(model, windows, mc_num=4, seed=2)), rel=1e-6)
    assert total < 0
