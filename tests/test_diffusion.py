"""Samplers and ELBO likelihood on tiny random models (fp32, CPU)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qdlm_bench.diffusion import (
    GenerationConfig,
    _elbo_losses,
    dream_tokens,
    generate,
    llada_tokens,
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
        return logits if positions is None else logits[positions]  # the likelihood's [B, L] mask


class MaskLover(nn.Module):
    """In every other column counted from the right (the same generated tokens whatever the left
    padding): logits sharpened (x3), the mask token's 4 above the largest. There the softmax
    without the mask token is confident, the full one is not."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, attention_mask=None, positions=None):
        logits = self.inner(input_ids, attention_mask=attention_mask, positions=positions)
        cols = torch.arange(input_ids.shape[1])[positions or slice(None)]
        loved = 3 * logits
        loved[..., MASK] = loved.amax(-1) + 4
        return torch.where(((input_ids.shape[1] - cols) % 2 == 0)[:, None], loved, logits)


class FixedLogits(nn.Module):
    """LLaDA-family model whose logits of the last ``len(rows)`` columns are ``rows`` (zeros elsewhere)."""

    def __init__(self, rows: torch.Tensor, mask_id: int):
        super().__init__()
        self.rows = rows
        self.config = SimpleNamespace(family="llada", mask_token_id=mask_id, pad_token_id=0, eos_token_id=0)
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, positions=None):
        logits = torch.zeros(*input_ids.shape, self.rows.shape[-1])
        logits[:, -len(self.rows):] = self.rows
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


# --- against the reference samplers, written here after LLaDA's generate.py and Dream's
# generation_utils._sample / sample_tokens, one prompt at a time, with the one detail ours adds: the
# predicted token is never the mask token; confidences come from the unmodified softmax.


def reference_llada(model, prompt, gen_length, steps, block_length, cfg_scale=0.0):
    """generate.py at temperature 0, low_confidence: (the generated region after every step, times the
    argmax at a masked position was the mask token)."""
    x = torch.full((1, len(prompt) + gen_length), MASK)
    x[0, : len(prompt)] = torch.tensor(prompt)
    prompt_index = x != MASK
    n_blocks, mask_top, states = gen_length // block_length, 0, []
    steps //= n_blocks
    for nb in range(n_blocks):
        end = len(prompt) + (nb + 1) * block_length
        n = int((x[:, end - block_length : end] == MASK).sum())
        schedule = [n // steps + (i < n % steps) for i in range(steps)]
        for i in range(steps):
            mask_index = x == MASK
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = MASK
                logits, un_logits = model(torch.cat([x, un_x])).chunk(2)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x)
            mask_top += int((logits.argmax(-1) == MASK)[mask_index].sum())
            choice = logits.clone()
            choice[..., MASK] = -torch.inf  # the detail: the token is never the mask token
            x0 = choice.argmax(-1)
            x0_p = torch.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            _, select = torch.topk(confidence[0], k=schedule[i])
            x[0, select] = x0[0, select]
            states.append(x[0, len(prompt) :].tolist())
    return states, mask_top


def reference_dream(model, prompt, gen_length, steps, alg, eps=1e-3):
    """Dream's _sample at temperature 0, alg_temp 0: (the generated region after every step, times the
    argmax was the mask token)."""
    x = torch.full((1, len(prompt) + gen_length), MASK)
    x[0, : len(prompt)] = torch.tensor(prompt)
    timesteps, mask_top, states = torch.linspace(1, eps, steps + 1), 0, []
    for i in range(steps):
        mask_index = x == MASK
        probs = torch.softmax(model(x)[mask_index], dim=-1)  # our Dream model shifts its logits
        confidence, x0 = probs.max(dim=-1)
        mask_top += int((x0 == MASK).sum())
        x0 = probs.index_fill(-1, torch.tensor(MASK), -1.0).argmax(-1)  # the detail
        if alg == "topk_margin":
            top = probs.sort(dim=-1, descending=True).values
            confidence = top[:, 0] - top[:, 1]
        elif alg == "entropy":
            confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
        t, s = timesteps[i], timesteps[i + 1]
        num_mask_token = mask_index.sum() / mask_index.shape[0]
        k = int(num_mask_token * (1 - s / t)) if i < steps - 1 else int(num_mask_token)
        full_confidence = torch.full(x.shape, -torch.inf)
        full_confidence[mask_index] = confidence
        if k > 0:
            _, select = torch.topk(full_confidence, k)
            x_ = torch.full_like(x, MASK)
            x_[mask_index] = x0
            x[0, select[0]] = x_[0, select[0]]
        states.append(x[0, len(prompt) :].tolist())
    return states, mask_top


def trajectory(model, prompt, cfg):
    """The generated region after every step of our sampler, for one prompt."""
    states = []
    generate(model, [prompt], cfg, on_step=lambda i, x: states.append(x[0, -cfg.gen_length:].tolist()))
    return states


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("mask_lover", [False, True])
def test_llada_equals_reference_generate_py(cfg_scale, mask_lover):
    model = MaskLover(tiny("llada")) if mask_lover else tiny("llada")
    cfg = GenerationConfig(gen_length=8, steps=8, block_length=4, sampler="llada", cfg_scale=cfg_scale)
    with torch.no_grad():
        refs = [reference_llada(model, p, 8, 8, 4, cfg_scale) for p in PROMPTS]
    assert [trajectory(model, p, cfg) for p in PROMPTS] == [states for states, _ in refs]
    assert generate(model, PROMPTS, cfg, batch_size=4) == [states[-1] for states, _ in refs]
    assert sum(n for _, n in refs) > 0 or not mask_lover  # the argmax was the mask token: it was skipped


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("mask_lover", [False, True])
def test_dream_equals_reference_sampler(alg, mask_lover):
    model = MaskLover(tiny("dream")) if mask_lover else tiny("dream")
    cfg = GenerationConfig(gen_length=8, steps=4, sampler="dream", alg=alg)
    with torch.no_grad():
        refs = [reference_dream(model, p, 8, 4, alg) for p in PROMPTS]
    assert [trajectory(model, p, cfg) for p in PROMPTS] == [states for states, _ in refs]
    assert generate(model, PROMPTS, cfg, batch_size=4) == [states[-1] for states, _ in refs]
    assert sum(n for _, n in refs) > 0 or not mask_lover


# mask id 5; row 0: the mask token has the largest logit, token 1 the next; row 1: token 0 leads
V6_MASK = 5
MASK_TOP = torch.tensor([[0.0, 4.0, 1.0, 0.0, 0.5, 5.0], [3.0, 0.0, 0.0, 2.0, 0.0, 0.0]])


@pytest.mark.parametrize("temperature, remasking", [(0.0, "low_confidence"), (1.0, "low_confidence"),
                                                    (0.0, "random")])
def test_llada_never_predicts_the_mask_and_reads_the_unmodified_softmax(temperature, remasking):
    cfg = GenerationConfig(temperature=temperature, remasking=remasking)
    logits = MASK_TOP.repeat(200, 1)
    tokens, conf = llada_tokens(logits, V6_MASK, cfg, torch.Generator().manual_seed(0))
    assert (tokens != V6_MASK).all()
    if temperature == 0:
        assert tokens[:2].tolist() == [1, 0]
    else:  # generate.py's add_gumbel_noise on the same uniforms, the mask token's score left out
        u = torch.rand(logits.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        noisy = logits.double().exp() / (-torch.log(u)) ** temperature
        assert torch.equal(tokens, noisy.index_fill(-1, torch.tensor(V6_MASK), -torch.inf).argmax(-1))
    if remasking == "low_confidence":
        assert torch.equal(conf, torch.softmax(logits.double(), -1).gather(-1, tokens[:, None]).squeeze(-1))
        assert conf[0] < 0.3  # the mask token keeps its share (0.26; renormalized without it: 0.90)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_never_predicts_the_mask_and_reads_the_unmodified_distribution(alg):
    probs = MASK_TOP.softmax(-1)
    tokens, conf = dream_tokens(MASK_TOP, V6_MASK, GenerationConfig(alg=alg), None)
    assert tokens.tolist() == [1, 0]
    top = probs.topk(2).values
    expected = {"maskgit_plus": top[:, 0], "topk_margin": top[:, 0] - top[:, 1],
                "entropy": (probs * torch.log(probs + 1e-10)).sum(-1)}[alg]
    assert torch.allclose(conf, expected)
    # sampling: draws avoid the mask token; the confidence is the drawn token's share of the
    # (tempered, filtered) distribution with the mask token in it
    cfg = GenerationConfig(alg="maskgit_plus", temperature=0.8, top_k=3)
    logits = MASK_TOP.repeat(200, 1)
    tokens, conf = dream_tokens(logits, V6_MASK, cfg, torch.Generator().manual_seed(0))
    assert (tokens != V6_MASK).all() and set(tokens[::2].tolist()) <= {1, 2}
    filtered = torch.where(logits >= logits.topk(3).values[:, -1:], logits / 0.8, torch.finfo(torch.float32).min)
    assert torch.allclose(conf, filtered.softmax(-1).gather(-1, tokens[:, None]).squeeze(-1))
    # only the mask token survives top_k=1 in row 0: its token is the best other one
    tokens, conf = dream_tokens(MASK_TOP, V6_MASK, GenerationConfig(temperature=1.0, top_k=1),
                                torch.Generator().manual_seed(0))
    assert tokens.tolist() == [1, 0] and conf[0] == 0


def test_llada_unmasks_by_the_unmodified_confidence():
    # column 0: the mask token leads, token 1 holds 0.26 of the softmax (0.90 without the mask
    # token); column 1: token 2 holds 0.74. Column 1 goes first, and neither becomes the mask.
    rows = torch.zeros(2, 8)
    rows[0, 7], rows[0, 1], rows[1, 2] = 5.0, 4.0, 3.0
    states = []
    out = generate(FixedLogits(rows, mask_id=7), [[3]], GenerationConfig(gen_length=2, steps=2, block_length=2),
                   on_step=lambda i, x: states.append(x[0, -2:].tolist()))
    assert states == [[7, 2], [1, 2]] and out == [[1, 2]]


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


def test_elbo_runs_the_lm_head_on_masked_positions_only(model):
    # the LM head sees one row per masked position, and the losses equal those computed from
    # every column's logits (Dream's shift included)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    seqs, masks = [torch.tensor([3, 1, 4, 1, 5, 9]), torch.tensor([2, 6, 5])], [
        torch.tensor([False, False, True, False, True, True]), torch.tensor([False, True, False])]
    try:
        with torch.no_grad():
            losses = _elbo_losses(model, seqs, masks, [3, 2])
    finally:
        hook.remove()
    assert seen == [4]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9], [2, 6, 5, 62, 62, 62]])
    is_mask = torch.tensor([[False, False, True, False, True, True], [False, True, False, False, False, False]])
    attn = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        logits = model(ids.masked_fill(is_mask, MASK), attention_mask=attn)[is_mask]
    ce = torch.nn.functional.cross_entropy(logits, ids[is_mask], reduction="none").double()
    expected = torch.stack([ce[:3].sum() * 3 / 3, ce[3:].sum() * 2 / 1])
    assert torch.allclose(losses, expected, rtol=1e-6)


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
