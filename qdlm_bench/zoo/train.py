"""Train the embedded tiny dLLMs: masked-diffusion pretraining and LLaDA-style SFT.

    python -m qdlm_bench.zoo.train tiny-llada-base --device cuda      # pretraining, LLaDA layout
    python -m qdlm_bench.zoo.train tiny-dream-base --device cuda      # pretraining, Dream layout
    python -m qdlm_bench.zoo.train tiny-llada-instruct --device cuda  # SFT of tiny-llada-base
    python -m qdlm_bench.zoo.train tiny-llada-base --smoke --out /tmp/x --save-to /tmp/m  # CPU check

Pretraining (LLaDA's recipe): random windows of the tokenized corpus, 1% of batches cut to a
random length; per sequence t ~ U(0, 1), p = (1 - eps) t + eps, every token masked with
probability p; loss = sum over masked tokens of CE / p, divided by all tokens of the batch.
SFT (LLaDA's): chat-formatted and raw (prompt, response) pairs from the task generators' train
split plus text continuation; the response is followed by end-of-text padding that is trained
on; the prompt is never masked; each row's loss is divided by its response length.

The run folder (``--out``) holds ``ckpt.pt``, written every ``--ckpt-minutes`` and resumed
from when present. A run ends at ``--steps`` or ``--minutes``, whichever comes first; the
learning-rate schedule (warmup, cosine to 10%) follows the same progress, so a time-limited
run still anneals. The result is saved in bf16 in the family's real checkpoint layout with the
tokenizer and a model card (``--save-to``, by default qdlm_bench/zoo/models/<name>).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models import DLLMConfig, DiffusionLM
from ..models.checkpoint import load_model, save_model
from . import corpus, tasks
from .tokenizer import VOCAB_SIZE, encode_docs, save_tokenizer, train_tokenizer

ZOO_MODELS = Path(__file__).parent / "models"
EPS = 1e-3
MAX_SEQ_LEN = 512

ARCH = {  # vocab 4096: ~6.3M parameters each, so the three models stay under 40 MB in bf16
    "llada": dict(d_model=256, n_layers=6, n_heads=4, n_kv_heads=4, d_ff=576, norm_eps=1e-5),
    "dream": dict(d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=640, norm_eps=1e-6,
                  qkv_bias=True, shift_logits=True),
}
SMOKE_ARCH = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64)


@dataclass
class Recipe:
    family: str
    stage: str  # "pretrain" | "sft"
    steps: int
    minutes: float
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    base: str | None = None  # the model an SFT stage starts from
    weight_decay: float = 0.1


RECIPES = {  # two GPU runs of < 10 min: both bases at once (7.5 min); then the SFT alone (12,000 steps, ~4.5 min)
    "tiny-llada-base": Recipe("llada", "pretrain", steps=20_000, minutes=4.7, batch_size=128,
                              seq_len=512, lr=1e-3, warmup=500),
    "tiny-dream-base": Recipe("dream", "pretrain", steps=20_000, minutes=7.5, batch_size=128,
                              seq_len=512, lr=1e-3, warmup=500),
    "tiny-llada-instruct": Recipe("llada", "sft", steps=12_000, minutes=6, batch_size=128,
                                  seq_len=192, lr=5e-4, warmup=100, base="tiny-llada-base"),
}
SFT_MIX = {"math": 0.35, "code": 0.30, "qa": 0.20, "text": 0.15}
SFT_POOL = 60_000


def model_config(family: str, tokenizer, smoke: bool = False) -> DLLMConfig:
    """The family's architecture with the tokenizer's special ids (``smoke``: a tiny one)."""
    vocab = -(-len(tokenizer) // 64) * 64 if smoke else VOCAB_SIZE
    if len(tokenizer) > vocab:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model only {vocab}")
    return DLLMConfig(family=family, vocab_size=vocab, max_seq_len=MAX_SEQ_LEN,
                      mask_token_id=tokenizer.mask_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, **{**ARCH[family], **(SMOKE_ARCH if smoke else {})})


def init_weights(model: DiffusionLM, seed: int) -> DiffusionLM:
    """GPT-2 style init: N(0, 0.02) weights, output projections scaled by 1/sqrt(2 n_layers)."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        else:
            residual = name.endswith(("o_proj.weight", "down_proj.weight"))
            torch.nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * model.config.n_layers) if residual else 0.02)
    return model


# ------------------------------------------------------------------------------------ data


def smoke_data(seed: int) -> tuple[np.ndarray, object]:
    """A tiny corpus (a few generated items per skill) and a small tokenizer trained on it."""
    docs = [text for _, text in corpus.generated_docs(seed, scale=0.002)][:300]
    tokenizer = train_tokenizer(docs, vocab_size=320)
    return encode_docs(tokenizer, docs), tokenizer


def sft_pairs(tokenizer, stream: np.ndarray, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + end-of-text) pairs: half chat-formatted, half raw task format."""
    r = random.Random(seed)
    texts = []
    for skill in tasks.SKILLS:
        texts += [tasks.pair(skill, it) for it in tasks.items(skill, "train", int(n * SFT_MIX[skill]), seed)]
    for _ in range(int(n * SFT_MIX["text"])):  # continue a stretch of the corpus
        i, cut = r.randrange(len(stream) - 160), r.randint(16, 96)
        head, tail = (tokenizer.decode(stream[a:b].tolist(), skip_special_tokens=True)
                      for a, b in ((i, i + cut), (i + cut, i + cut + 64)))
        texts.append(("Continue the text:\n" + head, tail))
    pairs = []
    for prompt, response in texts:
        if r.random() < 0.5 or prompt.startswith("Continue the text:"):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True)
            response = response if response.startswith("    ") else response.lstrip()  # keep code indentation
        pairs.append((prompt, response))
    enc = tokenizer.backend_tokenizer.encode_batch([t for p in pairs for t in p], add_special_tokens=False)
    eos = tokenizer.eos_token_id
    return [(enc[2 * i].ids, enc[2 * i + 1].ids + [eos]) for i in range(len(pairs))]


def sft_tensors(pairs, seq_len: int, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of prompt + response padded with end-of-text to ``seq_len``, and the prompt lengths."""
    pairs = [(p, a) for p, a in pairs if len(p) + len(a) <= seq_len]
    rows = torch.full((len(pairs), seq_len), eos, dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        rows[i, :len(p) + len(a)] = torch.tensor(p + a)
    return rows, torch.tensor([len(p) for p, _ in pairs])


# ------------------------------------------------------------------------------------ loss


def diffusion_loss(model, x: torch.Tensor, mask_id: int, gen: torch.Generator,
                   prompt_len: torch.Tensor | None = None) -> torch.Tensor:
    """LLaDA's masked-diffusion loss; with ``prompt_len``, its SFT loss (prompt never masked)."""
    b, n = x.shape
    p = (1 - EPS) * torch.rand(b, device=x.device, generator=gen) + EPS
    masked = torch.rand(b, n, device=x.device, generator=gen) < p[:, None]
    if prompt_len is not None:
        masked &= torch.arange(n, device=x.device)[None] >= prompt_len[:, None]
    logits = model(torch.where(masked, mask_id, x))
    rows = masked.nonzero()[:, 0]
    ce = F.cross_entropy(logits[masked].float(), x[masked], reduction="none") / p[rows]
    if prompt_len is None:
        return ce.sum() / (b * n)
    return (ce / (n - prompt_len)[rows]).sum() / b


# ----------------------------------------------------------------------------------- train


def lr_at(recipe: Recipe, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / recipe.warmup)
    return recipe.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def optimizer(model, recipe: Recipe, device: str) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), fused=device.startswith("cuda"))


def load_data(args):
    """(token stream, tokenizer, manifest) from ``--data`` or, with ``--smoke``, a tiny corpus."""
    if args.smoke:
        stream, tokenizer = smoke_data(args.seed)
        return stream, tokenizer, {"smoke": True}
    data = Path(args.data)
    if not (data / corpus.TOKENS).is_file():
        raise FileNotFoundError(f"{data}/{corpus.TOKENS} is missing; build it with `python -m "
                                "qdlm_bench.zoo.corpus --out .zoo-data` and pass --data .zoo-data/train")
    from transformers import AutoTokenizer

    manifest = json.loads((data / "manifest.json").read_text())
    return corpus.load_tokens(data / corpus.TOKENS), AutoTokenizer.from_pretrained(data / "tokenizer"), manifest


def build_model(args, recipe: Recipe, tokenizer):
    """A freshly initialised model, or for SFT the base model (its tokenizer replaces ours)."""
    if recipe.stage == "pretrain" or (args.smoke and not args.base):
        model = DiffusionLM(model_config(recipe.family, tokenizer, args.smoke))
        return init_weights(model, args.seed), tokenizer
    return load_model(args.base or ZOO_MODELS / recipe.base, dtype=torch.float32)


def batches(args, recipe: Recipe, stream: np.ndarray, tokenizer, cfg: DLLMConfig):
    """``batch(gen) -> (tokens [B, L], prompt lengths or None)``, drawn with ``gen`` only."""
    device = args.device
    if recipe.stage == "sft":
        pairs = sft_pairs(tokenizer, stream, 200 if args.smoke else SFT_POOL, args.seed)
        pool, prompt_lens = (t.to(device) for t in sft_tensors(pairs, recipe.seq_len, cfg.eos_token_id))

        def batch(gen):
            idx = torch.randint(0, len(pool), (recipe.batch_size,), device=device, generator=gen)
            return pool[idx], prompt_lens[idx]
        return batch
    tokens = torch.from_numpy(stream.astype(np.int64)).to(device)

    def batch(gen):
        n = recipe.seq_len
        if torch.rand((), device=device, generator=gen).item() < 0.01:  # LLaDA: 1% random lengths
            n = int(torch.randint(1, n + 1, (), device=device, generator=gen))
        starts = torch.randint(0, len(tokens) - n, (recipe.batch_size,), device=device, generator=gen)
        return tokens[starts[:, None] + torch.arange(n, device=device)], None
    return batch


def train(args) -> Path:
    """Run (or resume) one stage and save the model folder; returns the folder."""
    recipe = replace(RECIPES[args.name], **{k: v for k, v in dict(
        steps=args.steps, minutes=args.minutes, batch_size=args.batch_size).items() if v})
    if args.smoke:
        recipe = replace(recipe, steps=args.steps or 3, batch_size=4, seq_len=64, warmup=1)
    out, device = Path(args.out or f".zoo-runs/{args.name}"), args.device
    out.mkdir(parents=True, exist_ok=True)
    stream, tokenizer, manifest = load_data(args)
    model, tokenizer = build_model(args, recipe, tokenizer)
    model = model.float().to(device).train()
    opt = optimizer(model, recipe, device)
    step, elapsed, log = 0, 0.0, []
    if (out / "ckpt.pt").is_file():
        ck = torch.load(out / "ckpt.pt", map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed, log = ck["step"], ck["elapsed"], ck["log"]
        print(f"resumed {out / 'ckpt.pt'} at step {step} ({elapsed / 60:.1f} min)", flush=True)
    batch = batches(args, recipe, stream, tokenizer, model.config)
    fwd = torch.compile(model) if args.compile else model
    gen = torch.Generator(device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    torch.backends.cuda.matmul.allow_tf32 = True
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.name}: {n_params / 1e6:.2f}M parameters, {recipe}", flush=True)
    t0, last_ckpt, run_loss, run_n = time.time() - elapsed, time.time(), 0.0, 0
    while (progress := max(step / recipe.steps, (elapsed := time.time() - t0) / (60 * recipe.minutes))) < 1:
        gen.manual_seed(args.seed * 1_000_003 + step)  # a step's data and masks depend on nothing else
        x, prompt_len = batch(gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(recipe, step, progress)
        with autocast:
            loss = diffusion_loss(fwd, x, model.config.mask_token_id, gen, prompt_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, run_loss, run_n = step + 1, run_loss + loss.detach(), run_n + 1
        if step % args.log_every == 0 or args.smoke:
            log.append({"step": step, "loss": round(float(run_loss) / run_n, 4),
                        "minutes": round(elapsed / 60, 2), "lr": float(f"{lr_at(recipe, step, progress):.3g}")})
            print(json.dumps(log[-1]), flush=True)
            run_loss, run_n = 0.0, 0
        if time.time() - last_ckpt > 60 * args.ckpt_minutes:
            save_state(out, model, opt, step, time.time() - t0, log)
            last_ckpt = time.time()
    save_state(out, model, opt, step, elapsed, log)
    folder = Path(args.save_to or ZOO_MODELS / args.name)
    result = {"steps": step, "minutes": round(elapsed / 60, 2), "final_loss": log[-1]["loss"] if log else None}
    export(model, tokenizer, folder, args, recipe, manifest, result)
    print(f"saved {folder}", flush=True)
    return folder


def save_state(out: Path, model, opt, step: int, elapsed: float, log: list) -> None:
    tmp = out / "ckpt.pt.tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                "log": log}, tmp)
    tmp.replace(out / "ckpt.pt")


# ---------------------------------------------------------------------------------- export


def export(model, tokenizer, folder: Path, args, recipe: Recipe, manifest: dict, result: dict) -> None:
    """bf16 weights in the family's real layout, the tokenizer, and the model card."""
    bf16 = DiffusionLM(model.config).to(torch.bfloat16)
    bf16.load_state_dict(model.state_dict())
    save_model(bf16, folder)
    save_tokenizer(tokenizer, folder)
    (folder / "README.md").write_text(model_card(args.name, model, recipe, manifest, result, args))


def model_card(name: str, model, recipe: Recipe, manifest: dict, result: dict, args) -> str:
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    sources = manifest.get("sources", {})
    amp = "bf16 autocast, " if args.device.startswith("cuda") else ""
    data = "\n".join(f"| {k} | {v['docs']} | {v['bytes'] / 1e6:.2f} |" for k, v in sources.items())
    stage = ("Masked-diffusion pretraining from scratch (LLaDA's objective)" if recipe.stage == "pretrain" else
             f"LLaDA-style SFT of `{recipe.base}` on {SFT_POOL:,} pairs, mix {SFT_MIX} (only response "
             "tokens masked, end-of-text padding trained)")
    return f"""# {name}

A {n / 1e6:.2f}M-parameter diffusion language model in {'LLaDA' if c.family == 'llada' else 'Dream'}'s
real checkpoint layout (config.json + bf16 model.safetensors), trained by qdlm-bench:
`python -m qdlm_bench.zoo.train {name}`. It is a test subject for quantization studies, not a
useful language model.

## Architecture

| family | d_model | layers | heads | kv heads | d_ff | vocab | max length | q/k/v bias | shifted logits | parameters |
|---|---|---|---|---|---|---|---|---|---|---|
| {c.family} | {c.d_model} | {c.n_layers} | {c.n_heads} | {c.n_kv_heads} | {c.d_ff} | {c.vocab_size} | {c.max_seq_len} | {c.qkv_bias} | {c.shift_logits} | {n:,} |

Tokenizer: byte-level BPE (qdlm_bench/zoo/tokenizer.py), digits split, newlines isolated;
`<|endoftext|>` = {c.eos_token_id} (eos, pad), `<|mask|>` = {c.mask_token_id}, `<|user|>`,
`<|assistant|>`; chat template in tokenizer_config.json.

## Data

The corpus of qdlm_bench/zoo/corpus.py (see qdlm_bench/zoo/README.md): {manifest.get('tokens', 0):,} tokens,
seed {manifest.get('seed', '?')}; the mini tasks' items are held out by construction.

| source | documents | MB |
|---|---|---|
{data}

## Training

{stage}. {result['steps']} steps in {result['minutes']} minutes on {args.device}, batch {recipe.batch_size} x
{recipe.seq_len} tokens, AdamW (betas 0.9/0.95, weight decay {recipe.weight_decay}), lr {recipe.lr} with
{recipe.warmup} warmup steps and cosine decay to 10%, {amp}seed {args.seed}; final loss
{result['final_loss']}. Settings: `{json.dumps(asdict(recipe))}`.

## FP scores

_To be filled with measured numbers: `python run.py model={name} method=fp`._
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name", choices=sorted(RECIPES))
    ap.add_argument("--data", default=".zoo-data/train", help="tokens.npy.xz + tokenizer/ from zoo.corpus")
    ap.add_argument("--out", help="run folder with ckpt.pt (default .zoo-runs/<name>)")
    ap.add_argument("--save-to", help="model folder (default qdlm_bench/zoo/models/<name>)")
    ap.add_argument("--base", help="SFT: the base model folder (default qdlm_bench/zoo/models/<base>)")
    ap.add_argument("--minutes", type=float, help="time budget of this stage")
    ap.add_argument("--steps", type=int, help="step budget of this stage")
    ap.add_argument("--batch-size", type=int, help="sequences per step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--ckpt-minutes", type=float, default=2.0)
    ap.add_argument("--log-every", type=int, default=200)
    ap.add_argument("--check", action="store_true", help="score a few mini-task items at the end")
    ap.add_argument("--check-n", type=int, default=64, help="items of each mini task that --check scores")
    ap.add_argument("--smoke", action="store_true", help="a few CPU steps of a tiny model on a tiny corpus")
    args = ap.parse_args(argv)
    if args.smoke:
        args.device = "cpu"
    folder = train(args)
    if args.check:
        from .check import check

        model, tokenizer = load_model(folder, device=args.device)
        print(json.dumps(check(model.float(), tokenizer, n=4 if args.smoke else args.check_n)), flush=True)


if __name__ == "__main__":
    main()
