import copy
import json
import math

import pytest
import torch

from qdlm_bench import methods
from qdlm_bench import step_error
from qdlm_bench.diffusion import GenerationConfig
from qdlm_bench.models import DLLMConfig, DiffusionLM
from qdlm_bench.quant import QuantSpec

GEN = GenerationConfig(gen_length=16, steps=16, block_length=8)


def tiny_model(family: str) -> DiffusionLM:
    torch.manual_seed(0)
    dream = family == "dream"
    cfg = DLLMConfig(family=family, vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2 if dream else 4,
                     d_ff=64, qkv_bias=dream, shift_logits=dream, mask_token_id=63, eos_token_id=62, pad_token_id=62)
    return DiffusionLM(cfg).eval()


@pytest.fixture(scope="module", params=["llada", "dream"])
def fp(request):
    return tiny_model(request.param)


PROMPTS = torch.randint(0, 62, (3, 6), generator=torch.Generator().manual_seed(2))


def test_a_model_against_itself_has_no_error(fp):
    errors = step_error.step_errors(fp, copy.deepcopy(fp), PROMPTS, GEN)
    assert errors["step"] == list(range(16))
    assert errors[step_error.TOKENS] == [0.0] * 16 and errors[step_error.HIDDEN] == [0.0] * 16


def test_rtn_w2_errs_at_every_step(fp):
    quantized = copy.deepcopy(fp)
    methods.get("rtn")(quantized, QuantSpec.parse("w2a16"), None, {})
    errors = step_error.step_errors(fp, quantized, PROMPTS, GEN)
    assert all(e > 0.05 for e in errors[step_error.HIDDEN])
    assert errors[step_error.TOKENS][-1] > 0


def test_trajectory_records_every_step_and_ends_in_the_output(fp):
    states = step_error.trajectory(fp, PROMPTS, GEN)
    assert sorted(states) == list(range(16))
    masked = [int((states[s][:, -16:] == 63).sum()) for s in range(16)]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0
    assert (states[15][:, :6] == PROMPTS).all()


def test_bad_prompts_are_rejected(fp):
    with pytest.raises(ValueError, match="batch, length"):
        step_error.step_errors(fp, fp, PROMPTS[0], GEN)


def test_cli_writes_errors_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the calibration cache goes here
    out = tmp_path / "out"
    args = ["model=tiny_random_llada", "calib.n_samples=2", "calib.seqlen=16", "prompts=2", "prompt_len=8",
            "gen_length=8", "steps=8", "block_length=8", f"out={out}"]
    assert step_error.main(args + ["method=rtn", "bits=w2a16"]) == 0
    saved = json.loads((out / "step_error.json").read_text())
    assert saved["quantized"] == "rtn w2a16" and saved["step"] == list(range(8))
    assert all(e > 0 for e in saved[step_error.HIDDEN]) and not any(map(math.isnan, saved[step_error.TOKENS]))
    assert (out / "step_error.png").stat().st_size > 1000 and (out / "step_error.pdf").stat().st_size > 1000
    assert step_error.main(args + ["method=fp"]) == 0
    saved = json.loads((out / "step_error.json").read_text())
    assert saved["quantized"] == "fp" and set(saved[step_error.HIDDEN]) == {0.0}
    with pytest.raises(SystemExit, match="prompt_len"):
        step_error.main(args[:-1] + ["prompt_len=99", f"out={out}"])
