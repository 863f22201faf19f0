"""The benchmark commands run end to end on a tiny shape (their GPU figures come from the same code)."""

from __future__ import annotations

import pytest

from qdlm_bench.bench import quantize, sampler


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_bench_quantizes_every_linear_and_times_a_baseline(method):
    result = quantize.run([f"method={method}", "shape=tiny-llada", "n_samples=2", "seqlen=32", "batch_size=2"])
    assert result["method_info"]["layers"] == 2 * 7  # tiny-llada: 2 blocks x 7 linears
    assert result["quantize"]["seconds"] > 0 and result["baseline_forward_pass"]["seconds"] > 0


def test_sampler_bench_compares_batched_with_one_at_a_time():
    result = sampler.run(["shape=tiny-llada", "batch=2", "prompt_len=20", "gen_length=8", "steps=8",
                          "block_length=8", "baseline_prompts=1"])
    assert result["batched"]["prompts"] == 2 and result["one_at_a_time"]["prompts"] == 1
    assert result["speedup"] > 0


def test_bad_argument_names_the_valid_keys():
    with pytest.raises(SystemExit, match="n_samples"):
        quantize.run(["nsamples=4"])
