"""lm-eval's ``is_greedy``: decided by greedy diffusion decoding of the target, only where a task reads it."""

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from torch import nn  # noqa: E402

from qdlm_bench.evaluation import EvalSettings, adapter  # noqa: E402
from qdlm_bench.models import DiffusionLM, DLLMConfig  # noqa: E402
from qdlm_bench.models.tokenizer import byte_tokenizer  # noqa: E402

TOK = byte_tokenizer()
MASK = TOK.convert_tokens_to_ids("<|mask|>")
LETTERS = torch.tensor([TOK.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"])
CONTEXT = "The capital of France is"
SETTINGS = EvalSettings(mc_num=2, batch_size=8)


class LettersOnly(nn.Module):
    """A tiny random model whose predictions are lowercase letters (their logits +20); counts its calls."""

    def __init__(self, family: str):
        super().__init__()
        torch.manual_seed(0)
        dream = family == "dream"
        self.inner = DiffusionLM(DLLMConfig(
            family=family, vocab_size=len(TOK), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2 if dream else 4,
            d_ff=64, qkv_bias=dream, shift_logits=dream, mask_token_id=MASK, eos_token_id=TOK.eos_token_id,
            pad_token_id=TOK.pad_token_id)).eval()
        self.config, self.calls = self.inner.config, 0

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, attention_mask=None, positions=None):
        self.calls += 1
        logits = self.inner(input_ids, attention_mask=attention_mask, positions=positions).clone()
        logits[..., LETTERS] += 20.0
        return logits


def suffix_greedy(model, prefix: list[int], n: int) -> list[int]:
    """LLaDA's eval_llada.py ``suffix_greedy_prediction``: unmask, one per step, the most confident argmax."""
    seq = torch.full((1, len(prefix) + n), MASK)
    seq[0, : len(prefix)] = torch.tensor(prefix)
    for _ in range(n):
        mask_index = seq == MASK
        logits = model(seq)[mask_index]
        x0 = logits.argmax(-1)
        confidence = logits.softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
        x0[confidence.argsort(descending=True)[1:]] = MASK
        seq[mask_index] = x0
    return seq[0, len(prefix) :].tolist()


def request(task, continuation, doc_id=0, idx=0):
    return Instance(request_type="loglikelihood", doc={}, arguments=(CONTEXT, continuation), idx=idx,
                    metadata=(task, doc_id, 1))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_is_greedy_is_true_exactly_for_the_greedy_decoding(family):
    model = LettersOnly(family)
    with torch.no_grad():
        greedy = TOK.decode(suffix_greedy(model, TOK(CONTEXT)["input_ids"], 3))
    other = greedy[:-1] + ("a" if greedy[-1] != "a" else "b")
    model.calls = 0
    out = adapter.DiffusionLMAdapter(model, TOK, SETTINGS).loglikelihood(
        [request("lambada_openai", greedy, doc_id=0), request("lambada_openai", other, doc_id=1)])
    assert [g for _, g in out] == [True, False]
    # one likelihood pass (2 requests x 2 samples in a batch of 8), then 3 decoding steps for both targets
    assert model.calls == 1 + 3


def test_multiple_choice_requests_are_never_decoded():
    model = LettersOnly("llada")
    choices = [request("arc_easy_local", c, idx=i) for i, c in enumerate(["abc", "xyz", "q"])]
    out = adapter.DiffusionLMAdapter(model, TOK, SETTINGS).loglikelihood(choices)
    assert [g for _, g in out] == [False] * 3
    assert model.calls == 1  # 3 requests x 2 samples: one likelihood pass, nothing else
