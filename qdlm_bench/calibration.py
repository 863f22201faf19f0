"""Calibration sets: a text corpus -> ``n_samples`` random token windows of ``seqlen``, optionally
masked; or task prompts -> ``n_samples`` left-padded prompts.

    cfg = CalibConfig.from_dict({"source": "wikitext2", "n_samples": 128, "seqlen": 2048})
    calib = build(cfg, tokenizer, mask_token_id=model.config.mask_token_id)
    for batch in calib.to(device).batches(8): model(batch.input_ids, batch.attention_mask)

Sources: ``wikitext2`` (the study calibrates on the WikiText-2 *train* split, which is not
available offline; we use the raw *test* split in ``<data_dir>/wikitext2``, so calibration and
wikitext perplexity share text), ``tinyshakespeare``, ``mini_ppl`` (the tiny zoo models'
held-out text, ``tasks/mini/mini_ppl.jsonl``; it is also the ``mini_ppl`` eval set), or a path
to any local ``.txt`` / ``.jsonl`` file (field ``text_field``). As in GPTQ's ``get_wikitext2``,
the whole text is tokenized once (no special tokens added) and windows start at seeded random
positions. Masking ``random`` replaces round(t * n) of the n tokens of each sample with the
model's mask token, t drawn per sample from ``mask_ratio``. Results are cached on disk under a
hash of everything that defines them (see ``cache_key``).

``prompts:<task>[+<task>...]`` (e.g. ``prompts:mini_math+mini_code``, ``prompts:gsm8k_local``) reads
the prompts (``doc_to_text``, zero-shot, never the answers) of project or lm-eval tasks: from a
task's training split when it has one, else from its evaluation documents (then the prompts of
evaluated items; only their answers stay unseen). ``n_samples`` distinct prompts are drawn at
random; each is encoded as the evaluation adapter encodes prompts (with ``chat_template``, first
wrapped as a user turn), keeps its last ``seqlen`` tokens and is left-padded (``attention_mask``).
Random masking spares the padding. Prompt sets are clean-text calibration for any method
and the prompts of DLLMQuant's TMAS trajectories (``qdlm_bench.tmas``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from qdlm_bench.diffusion import forbid_mask as _forbid_mask, pad_rows as _pad
from qdlm_bench.zoo.corpus import calibration_text

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
DATA_SOURCES = {"wikitext2": "wikitext2/raw/wiki.test.raw.reconstructed", "tinyshakespeare": "tinyshakespeare/input.txt"}
PROJECT_SOURCES = {"mini_ppl": PROJECT_DIR / "tasks" / "mini" / "mini_ppl.jsonl"}
# text made by code: the tiny models' held-out pretraining mix
GENERATED_SOURCES = {"zoo_mix": lambda: calibration_text(PROJECT_SOURCES["mini_ppl"])}
PROMPTS_PREFIX = "prompts:"
MASK_DISTS = {"uniform": {"low", "high"}, "fixed": {"value"}}
CACHE_VERSION = 2


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """What defines a calibration set (the ``calib`` config group)."""

    source: str = "wikitext2"
    n_samples: int = 128
    seqlen: int = 2048
    masking: str = "none"                 # none | random
    mask_ratio: dict = dataclasses.field(default_factory=lambda: {"dist": "uniform", "low": 0.0, "high": 1.0})
    seed: int = 0
    text_field: str = "text"              # the text field of a .jsonl source
    chat_template: bool = False           # prompts: sources: wrap each prompt in the chat template (else ignored)

    @classmethod
    def from_dict(cls, d: Mapping) -> CalibConfig:
        """Build from a plain dict or an OmegaConf node; unknown keys raise ValueError."""
        if hasattr(d, "_metadata"):  # an OmegaConf node
            from omegaconf import OmegaConf
            d = OmegaConf.to_container(d, resolve=True)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown calib keys {unknown}; valid keys: {valid}")
        return cls(**d)

    def __post_init__(self):
        if self.masking not in ("none", "random"):
            raise ValueError(f"calib.masking must be 'none' or 'random', got {self.masking!r}")
        if self.n_samples < 1 or self.seqlen < 1:
            raise ValueError(f"calib.n_samples and calib.seqlen must be >= 1, got {self.n_samples}, {self.seqlen}")
        if self.prompt_tasks is not None and not all(self.prompt_tasks):
            raise ValueError(f"calib.source {self.source!r}: expected prompts:<task>[+<task>...], "
                             "e.g. prompts:mini_math+mini_code")
        object.__setattr__(self, "mask_ratio", dict(self.mask_ratio))
        dist = self.mask_ratio.get("dist")
        if dist not in MASK_DISTS:
            raise ValueError(f"calib.mask_ratio.dist must be one of {sorted(MASK_DISTS)}, got {dist!r}")
        extra = set(self.mask_ratio) - {"dist", *set().union(*MASK_DISTS.values())}
        missing = MASK_DISTS[dist] - set(self.mask_ratio)
        if extra or missing:
            raise ValueError(f"calib.mask_ratio with dist {dist!r} takes keys {sorted(MASK_DISTS[dist])}; "
                             f"unknown {sorted(extra)}, missing {sorted(missing)}")
        # keys of the other distribution (left over from a Hydra merge) are dropped
        object.__setattr__(self, "mask_ratio", {"dist": dist, **{k: float(self.mask_ratio[k]) for k in sorted(MASK_DISTS[dist])}})
        keys = MASK_DISTS[dist]
        values = [float(self.mask_ratio[k]) for k in keys]
        if not all(0.0 <= v <= 1.0 for v in values) or self.mask_ratio.get("low", 0) > self.mask_ratio.get("high", 1):
            raise ValueError(f"calib.mask_ratio values must lie in [0, 1] (low <= high), got {self.mask_ratio}")

    @property
    def prompt_tasks(self) -> list[str] | None:
        """The task names of a ``prompts:`` source (None for a text source)."""
        return self.source[len(PROMPTS_PREFIX):].split("+") if self.source.startswith(PROMPTS_PREFIX) else None

    def defining(self) -> dict:
        """The fields that define the set (mask_ratio only when masking is on, chat_template only when on
        for a prompts: source)."""
        d = dataclasses.asdict(self)
        if self.masking == "none":
            d.pop("mask_ratio")
        if not (self.chat_template and self.prompt_tasks):
            d.pop("chat_template")
        return d


@dataclasses.dataclass
class CalibSet:
    """``input_ids`` [N, L] (masked where ``masked`` [N, L] is True), ``mask_ratio`` [N] per sample.

    Optional, all [N, L]: ``attention_mask`` (1 = token, 0 = left padding; None = no padding),
    ``confidence`` (the FP model's, see ``confidences``), ``token_weights`` (weights of each
    token in the statistics of calibrated methods, e.g. DLLMQuant's CGQ; None = equal).
    """

    input_ids: torch.Tensor
    masked: torch.Tensor
    mask_ratio: torch.Tensor
    key: str = ""
    attention_mask: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are set, by name."""
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}

    def _map(self, fn) -> CalibSet:
        return dataclasses.replace(self, **{name: fn(t) for name, t in self.tensors().items()})

    def to(self, device) -> CalibSet:
        return self._map(lambda t: t.to(device))

    def batches(self, batch_size: int) -> Iterator[CalibSet]:
        """Consecutive slices of at most ``batch_size`` samples."""
        for i in range(0, len(self), batch_size):
            yield self._map(lambda t: t[i:i + batch_size])


def resolve_source(cfg: CalibConfig, data_dir=None) -> Path:
    """The file a source names; a clear FileNotFoundError when it is absent."""
    if cfg.source in DATA_SOURCES:
        if data_dir is None:
            from qdlm_bench.evaluation.tasks import default_data_dir
            data_dir = default_data_dir()
        path = Path(data_dir) / DATA_SOURCES[cfg.source]
        hint = "set eval.data_dir (or $QDLM_DATA_DIR) to the offline data folder, or calib.source to a local file"
    elif cfg.source in PROJECT_SOURCES:
        path, hint = PROJECT_SOURCES[cfg.source], "set calib.source to another source"
    else:
        path = Path(cfg.source).expanduser()
        names = sorted([*DATA_SOURCES, *PROJECT_SOURCES, *GENERATED_SOURCES])
        hint = f"calib.source is a name ({names}), prompts:<task>, or a .txt/.jsonl file"
    if not path.is_file():
        raise FileNotFoundError(f"calibration source {cfg.source!r}: file {path} not found; {hint}")
    return path


def read_text(path: Path, text_field: str = "text") -> str:
    """A .jsonl file's ``text_field`` values joined by blank lines; any other file as is."""
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8")
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if text_field not in row:
                raise ValueError(f"{path}:{n} has no field {text_field!r} (calib.text_field); fields: {sorted(row)}")
            texts.append(row[text_field])
    return "\n\n".join(texts)


def task_prompts(tasks: list[str], data_dir=None) -> list[str]:
    """Zero-shot prompts (``doc_to_text``) of every document of ``tasks`` (groups expand to their
    tasks): a task's training split when it has one, else its evaluation documents."""
    from qdlm_bench.evaluation.tasks import build_tasks, leaf_tasks, resolve_tasks

    prompts = []
    for task in leaf_tasks(build_tasks(resolve_tasks(tasks, data_dir))):
        docs = task.training_docs() if task.has_training_docs() else task.eval_docs
        for doc in docs:
            text = task.doc_to_text(doc)
            if not isinstance(text, str):
                raise ValueError(f"task {task.config.task!r} has no text prompt (doc_to_text gave "
                                 f"{type(text).__name__}); use another task for calib.source prompts:...")
            prompts.append(text)
    return prompts


def source_texts(cfg: CalibConfig, data_dir=None) -> list[str]:
    """What a source holds: one string per prompt (``prompts:``), else the whole text as one string."""
    tasks = cfg.prompt_tasks
    if tasks is not None:
        return task_prompts(tasks, data_dir)
    if cfg.source in GENERATED_SOURCES:
        return [GENERATED_SOURCES[cfg.source]()]
    return [read_text(resolve_source(cfg, data_dir), cfg.text_field)]


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (fast tokenizers) or sorted vocabulary, with class and length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{len(tokenizer)}|{spec}".encode()).hexdigest()


def cache_key(cfg: CalibConfig, tokenizer, mask_token_id: int, texts: list[str]) -> str:
    """Hash of the defining config, tokenizer fingerprint, source content (``source_texts``) and mask id."""
    parts = {"version": CACHE_VERSION, "cfg": cfg.defining(), "tokenizer": tokenizer_fingerprint(tokenizer),
             "source_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
             "mask_token_id": int(mask_token_id)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def sample_windows(tokens: torch.Tensor, n: int, seqlen: int, gen: torch.Generator, source: str = "") -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at random start positions -> [n, seqlen]."""
    if tokens.numel() < seqlen:
        raise ValueError(f"calibration source {source!r} has only {tokens.numel()} tokens, fewer than "
                         f"calib.seqlen={seqlen}; use calib.seqlen <= {tokens.numel()} or a longer text")
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (n,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def draw_ratios(spec: dict, n: int, gen: torch.Generator) -> torch.Tensor:
    if spec["dist"] == "fixed":
        return torch.full((n,), float(spec["value"]))
    low, high = float(spec["low"]), float(spec["high"])
    return low + (high - low) * torch.rand(n, generator=gen)


def encode_prompt(tokenizer, text: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt as the evaluation adapter encodes it: BOS unless the text starts with it;
    with ``chat_template``, the text is first wrapped as a user turn with the generation prompt."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("calib.chat_template is on, but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def sample_prompts(prompts: list[list[int]], n: int, seqlen: int, pad_id: int, gen: torch.Generator,
                   source: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` distinct prompts at random, each cut to its last ``seqlen`` tokens and left-padded
    with ``pad_id`` -> (ids [n, L], attention mask [n, L] or None when all have one length)."""
    if n > len(prompts):
        raise ValueError(f"calibration source {source!r} has {len(prompts)} prompts, fewer than "
                         f"calib.n_samples={n}; use calib.n_samples <= {len(prompts)} or add tasks")
    chosen = torch.randperm(len(prompts), generator=gen)[:n].tolist()
    return _pad([torch.tensor(prompts[i][-seqlen:], dtype=torch.long) for i in chosen], pad_id, left=True)


def apply_masking(ids: torch.Tensor, ratios: torch.Tensor, mask_token_id: int, gen: torch.Generator,
                  attention_mask: torch.Tensor | None = None):
    """Mask round(t * n) uniformly chosen of the n real tokens of each row -> (masked ids, masked flags)."""
    n, length = ids.shape
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    counts = (ratios * real.sum(1)).round().long()
    scores = torch.rand(n, length, generator=gen).masked_fill(~real, 2.0)  # padding ranks last
    ranks = scores.argsort(dim=1).argsort(dim=1)  # a random permutation of the real tokens per row
    masked = ranks < counts[:, None]
    return ids.masked_fill(masked, mask_token_id), masked


def _file_name(source: str, key: str) -> str:
    stem = re.sub(r"[^\w.+-]", "_", Path(source).stem)
    return f"{stem}-{key[:16]}.pt"


def build(cfg: CalibConfig | Mapping, tokenizer, mask_token_id: int, data_dir=None,
          cache_dir: str | Path | None = ".cache/calib") -> CalibSet:
    """The calibration set ``cfg`` defines, loaded from ``cache_dir`` when built before (None: no cache)."""
    cfg = cfg if isinstance(cfg, CalibConfig) else CalibConfig.from_dict(cfg)
    texts = source_texts(cfg, data_dir)
    key = cache_key(cfg, tokenizer, mask_token_id, texts)
    file = Path(cache_dir) / _file_name(cfg.source, key) if cache_dir is not None else None
    if file is not None and file.is_file():
        log.info("calibration: loaded cached set %s", file)
        return load(file, key)
    gen = torch.Generator().manual_seed(cfg.seed)
    attn = None
    if cfg.prompt_tasks is not None:
        pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        prompts = [encode_prompt(tokenizer, t, cfg.chat_template) for t in texts]
        ids, attn = sample_prompts(prompts, cfg.n_samples, cfg.seqlen, pad_id, gen, cfg.source)
    else:
        ids = sample_windows(_tokenize(tokenizer, texts[0]), cfg.n_samples, cfg.seqlen, gen, cfg.source)
    if cfg.masking == "random":
        ratios = draw_ratios(cfg.mask_ratio, cfg.n_samples, gen)
        ids, masked = apply_masking(ids, ratios, mask_token_id, gen, attn)
    else:
        ratios, masked = torch.zeros(cfg.n_samples), torch.zeros_like(ids, dtype=torch.bool)
    calib = CalibSet(ids, masked, ratios, key, attention_mask=attn)
    if file is not None:
        save(calib, file, cfg=cfg.defining())
        log.info("calibration: built %d x %d from %s, cached at %s", *ids.shape, cfg.source, file)
    return calib


def save(calib: CalibSet, file: Path, **extra) -> None:
    """Write ``calib``'s tensors (and ``extra`` entries, for inspection) to ``file`` atomically."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    torch.save({**calib.tensors(), **extra}, tmp)
    os.replace(tmp, file)


def load(file: Path, key: str) -> CalibSet:
    """The CalibSet ``save`` wrote to ``file``."""
    d = torch.load(file, weights_only=True)
    return CalibSet(**{f.name: d[f.name] for f in dataclasses.fields(CalibSet) if f.name in d}, key=key)


@torch.no_grad()
def confidences(model, calib: CalibSet, batch_size: int = 8) -> torch.Tensor:
    """The model's per-token confidence [N, L] on ``calib``, float32 on the CPU: at masked positions the
    largest softmax probability (the mask token excluded, as the samplers decide), elsewhere the
    probability of the token present."""
    out = []
    for b in calib.to(model.device).batches(batch_size):
        logits = _forbid_mask(model(b.input_ids, attention_mask=b.attention_mask).float(), model.config.mask_token_id)
        probs = logits.softmax(-1)
        present = probs.gather(-1, b.input_ids[..., None]).squeeze(-1)
        out.append(torch.where(b.masked, probs.amax(-1), present).cpu())
    return torch.cat(out)
