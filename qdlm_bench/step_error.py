"""Quantization error across the decoding steps of a dLLM sampler: an FP model against its quantized twin.

    python -m qdlm_bench.step_error model=tiny_llada_instruct method=rtn bits=w2a16 \\
        [prompts=8] [prompt_len=32] [gen_length=64] [steps=64] [block_length=32] [out=reports/step_error/NAME]

Prompts: the first ``prompts`` windows of the calibration set (calib group) cut to ``prompt_len``
tokens. Sampler: the model preset's (greedy by default), with gen_length / steps / block_length.
Both measures are plotted against the step index (steps that ran the model):

- token disagreement, free running: each model samples its own trajectory from the same
  prompts; the share of generated positions whose token (or mask) differs after the step;
- hidden-state relative error, teacher-forced: both models read the FP trajectory's state at
  the step (the input of the FP model's forward there); ||h_q - h_fp|| / ||h_fp|| of the final
  hidden states (after the last norm) over the generated positions.

Writes step_error.json and step_error.{png,pdf} to ``out`` (default
reports/step_error/<model>-<method>-<bits>); wandb.mode=offline|online logs them (job type "step-error").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from qdlm_bench import analysis, plots
from qdlm_bench.diffusion import GenerationConfig, generate

OPTIONS = {"prompts": 8, "prompt_len": 32, "gen_length": 64, "steps": 64, "block_length": 32, "out": None}
TOKENS, HIDDEN = "token_disagreement", "hidden_rel_error"


def trajectory(model: nn.Module, prompts: torch.Tensor, cfg: GenerationConfig, seed: int = 0) -> dict[int, torch.Tensor]:
    """{step: the sequences [B, prompt + gen_length] after that step} of ``model`` sampling from ``prompts``."""
    states = {}
    generate(model, prompts.tolist(), cfg, batch_size=len(prompts),
             generator=torch.Generator(device=model.device).manual_seed(seed),
             on_step=lambda step, x: states.__setitem__(step, x.detach().cpu().clone()))
    return states


@torch.no_grad()
def _hidden_error(fp: nn.Module, quantized: nn.Module, x: torch.Tensor, gen_length: int) -> float:
    hs = [m.hidden_states(x.to(m.device))[:, -gen_length:].double().cpu() for m in (fp, quantized)]
    return float((hs[1] - hs[0]).norm() / hs[0].norm())


def step_errors(fp: nn.Module, quantized: nn.Module, prompts: torch.Tensor, cfg: GenerationConfig,
                seed: int = 0) -> dict[str, list]:
    """{"step", "token_disagreement", "hidden_rel_error"}: per sampler step, the free-running token
    disagreement and the teacher-forced hidden-state relative error (see the module docstring).
    ``prompts`` [B, P]: one length, so no padding."""
    if prompts.ndim != 2 or not prompts.numel():
        raise ValueError(f"prompts must be a non-empty [batch, length] tensor, got shape {tuple(prompts.shape)}")
    ref, own = trajectory(fp, prompts, cfg, seed), trajectory(quantized, prompts, cfg, seed)
    steps = sorted(ref)
    start = torch.cat([prompts, torch.full((len(prompts), cfg.gen_length), fp.config.mask_token_id)], dim=1)
    inputs = [start] + [ref[s] for s in steps[:-1]]  # what the FP model read at each step
    g = cfg.gen_length
    return {
        "step": steps,
        TOKENS: [float((ref[s][:, -g:] != own[s][:, -g:]).double().mean()) if s in own else float("nan")
                 for s in steps],
        HIDDEN: [_hidden_error(fp, quantized, x, g) for x in inputs],
    }


def plot(errors: dict[str, list], stem: Path, title: str) -> list[Path]:
    steps = errors["step"]
    panels = {"token disagreement (each model's own trajectory)": {TOKENS: (steps, errors[TOKENS])},
              "hidden-state relative error (teacher-forced on FP states)": {HIDDEN: (steps, errors[HIDDEN])}}
    return plots.line_panels(panels, stem, title=title, xlabel="decoding step")


def main(argv: list[str] | None = None) -> int:
    cfg, opt, _ = analysis.parse_args(sys.argv[1:] if argv is None else argv, OPTIONS)
    spec = analysis.build_spec(cfg)
    fp, tokenizer = analysis.load(spec)
    windows = analysis.token_windows(cfg, spec, tokenizer, fp.config.mask_token_id)
    if opt["prompt_len"] > windows.shape[1]:
        raise SystemExit(f"prompt_len={opt['prompt_len']} exceeds calib.seqlen={windows.shape[1]}")
    prompts = windows[:opt["prompts"], :opt["prompt_len"]]
    gen_cfg = GenerationConfig(**{**spec.settings.generation_defaults,
                                  **{k: opt[k] for k in ("gen_length", "steps", "block_length")}})
    label = analysis.label(spec)
    errors = step_errors(fp.eval(), analysis.quantized(spec, cfg), prompts, gen_cfg, spec.seed)
    out = Path(opt["out"] or analysis.default_out("step_error", f"{spec.model['name']}-{label}"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_error.json").write_text(json.dumps(
        {"model": spec.model["name"], "quantized": label, "prompts": list(prompts.shape),
         "generation": vars(gen_cfg), **errors}, indent=1))
    files = [out / "step_error.json",
             *plot(errors, out / "step_error", f"{spec.model['name']}: {label} vs fp over decoding steps")]
    last = {k: errors[k][-1] for k in (TOKENS, HIDDEN)}
    print(f"{label} vs fp, {len(prompts)} prompts, {len(errors['step'])} steps: final token disagreement "
          f"{last[TOKENS]:.3f}, last-step hidden relative error {last[HIDDEN]:.3g}; wrote {out}")
    analysis.logger(cfg).log_outputs(f"step-error-{out.name}", "step-error", config=cfg, files=files,
                                     images=[p for p in files if p.suffix == ".png"],
                                     summary={f"final/{k}": v for k, v in last.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
