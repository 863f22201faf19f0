"""The likelihood benchmark:

    python -m qdlm_bench.bench likelihood [shape=llada-8b] [requests=16] [prefix_len=100]
        [target_len=8] [mc_num=128] [batches=32,128] [compile=0] [profile=0] [seed=0] [out=bench.json]

likelihood: the Monte-Carlo ELBO path (``diffusion.loglikelihood``, what every likelihood task
runs) on a random-weight model of ``shape`` (bf16 on GPU, fp32 on CPU) over ``requests`` random
(prefix, target) pairs of about ``prefix_len`` and ``target_len`` tokens (±20%, so rows pad), at
``mc_num`` samples each, for each ``batch_size`` of ``batches``. Per batch size: seconds,
requests/s, TFLOP/s and the fraction of the GPU's bf16 dense peak. FLOPs counted: the layers on
every real token, the LM head on the masked positions (the only ones the ELBO reads); padding is
not counted. ``before``: the same batches with the LM head on every column (what the path did
before it ran the head on the masked positions only), timed in the same run. ``profile=1`` adds
the profiler's top CUDA kernels of one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qdlm_bench.diffusion import batched, loglikelihood, mc_rows, pad_rows, pad_token_id

from .common import bench_model, device_peak, forward_flops, kernel_profile, parse_args, random_tokens, timed


def random_requests(cfg, n: int, prefix_len: int, target_len: int, seed: int):
    """``n`` (prefix, target) pairs of random tokens, lengths ``prefix_len`` and ``target_len`` ±20%."""
    g = torch.Generator().manual_seed(seed)

    def length(mean: int) -> int:
        return max(1, int(mean * (0.8 + 0.4 * torch.rand((), generator=g))))

    return [(random_tokens(cfg, length(prefix_len), g), random_tokens(cfg, length(target_len), g)) for _ in range(n)]


def counted_flops(cfg, requests, mc_num: int, seed: int) -> float:
    """Layers on every real token of every sample, LM head on its masked positions."""
    total = 0.0
    for _, seq, mask in mc_rows(requests, range(len(requests)), mc_num, seed):
        total += forward_flops(cfg, len(seq), int(mask.sum()))
    return total


@torch.inference_mode()
def full_head_losses(model, requests, mc_num: int, batch_size: int, seed: int) -> None:
    """The ELBO batches with the LM head on every column (the path's former cost), for ``before``."""
    for batch in batched(mc_rows(requests, range(len(requests)), mc_num, seed), batch_size):
        _, seqs, masks = zip(*batch)
        ids, attn = pad_rows(list(seqs), pad_token_id(model), left=False)
        is_mask, _ = pad_rows(list(masks), False, left=False)
        ids, is_mask = ids.to(model.device), is_mask.to(model.device)
        noisy = ids.masked_fill(is_mask, model.config.mask_token_id)
        logits = model(noisy, attention_mask=None if attn is None else attn.to(model.device))
        F.cross_entropy(logits[is_mask].float(), ids[is_mask], reduction="none").sum().item()


def run(argv: list[str]) -> dict:
    a = parse_args(argv, dict(shape="llada-8b", requests=16, prefix_len=100, target_len=8, mc_num=128,
                              batches="32,128", compile=0, profile=0, seed=0, out=""))
    model = bench_model(a["shape"], a["seed"], a["compile"])
    cfg = model.config
    requests = random_requests(cfg, a["requests"], a["prefix_len"], a["target_len"], a["seed"])
    flops = counted_flops(cfg, requests, a["mc_num"], a["seed"])
    gpu, peak = device_peak()
    result = {"bench": "likelihood", "args": a, "device": gpu, "dtype": str(model.dtype), "peak_tflops_bf16": peak,
              "counted_tflop": round(flops / 1e12, 3)}
    for batch in (int(b) for b in a["batches"].split(",")):
        def ours():
            loglikelihood(model, requests, mc_num=a["mc_num"], batch_size=batch, seed=a["seed"])

        def before():
            full_head_losses(model, requests, a["mc_num"], batch, a["seed"])

        loglikelihood(model, requests[:2], mc_num=a["mc_num"], batch_size=batch, seed=a["seed"])  # warm-up
        before_s, ours_s = timed(before), timed(ours)
        row = {}
        for name, s in (("ours", ours_s), ("before", before_s)):
            achieved = flops / s / 1e12
            row[name] = {"seconds": round(s, 3), "requests_per_s": round(len(requests) / s, 3),
                         "tflops": round(achieved, 4), "fraction_of_peak": peak and round(achieved / peak, 3)}
        row["speedup"] = round(before_s / ours_s, 3)
        if a["profile"]:
            row["profile"] = kernel_profile(lambda: loglikelihood(model, requests[:1], mc_num=batch,
                                                                  batch_size=batch, seed=a["seed"]))
        result[f"batch{batch}"] = row
    return result
