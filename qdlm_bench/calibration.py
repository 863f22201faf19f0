"""Calibration sets: a text corpus -> ``n_samples`` random token windows of ``seqlen``, optionally masked.

    cfg = CalibConfig.from_dict({"source": "wikitext2", "n_samples": 128, "seqlen": 2048})
    calib = build(cfg, tokenizer, mask_token_id=model.config.mask_token_id)
    for batch in calib.to(device).batches(8): model(batch.input_ids)

Sources: ``wikitext2`` (the study calibrates on the WikiText-2 *train* split, which is not
available offline; we use the raw *test* split in ``<data_dir>/wikitext2``, so calibration and
wikitext perplexity share text), ``tinyshakespeare``, ``mini_ppl`` (the tiny zoo models'
held-out text, ``tasks/mini/mini_ppl.jsonl``; it is also the ``mini_ppl`` eval set), or a path
to any local ``.txt`` / ``.jsonl`` file (field ``text_field``). As in GPTQ's ``get_wikitext2``,
the whole text is tokenized once (no special tokens added) and windows start at seeded random
positions. Masking ``random`` replaces round(t * seqlen) positions of each sample with the
model's mask token, t drawn per sample from ``mask_ratio``. Results are cached on disk under a
hash of everything that defines them (see ``cache_key``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
DATA_SOURCES = {"wikitext2": "wikitext2/raw/wiki.test.raw.reconstructed", "tinyshakespeare": "tinyshakespeare/input.txt"}
PROJECT_SOURCES = {"mini_ppl": PROJECT_DIR / "tasks" / "mini" / "mini_ppl.jsonl"}
MASK_DISTS = {"uniform": {"low", "high"}, "fixed": {"value"}}
CACHE_VERSION = 1


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

    def defining(self) -> dict:
        """The fields that define the set (mask_ratio only when masking is on)."""
        d = dataclasses.asdict(self)
        if self.masking == "none":
            d.pop("mask_ratio")
        return d


@dataclasses.dataclass
class CalibSet:
    """``input_ids`` [N, L] (masked where ``masked`` [N, L] is True), ``mask_ratio`` [N] drawn per sample."""

    input_ids: torch.Tensor
    masked: torch.Tensor
    mask_ratio: torch.Tensor
    key: str = ""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> CalibSet:
        return CalibSet(self.input_ids.to(device), self.masked.to(device), self.mask_ratio.to(device), self.key)

    def batches(self, batch_size: int) -> Iterator[CalibSet]:
        """Consecutive slices of at most ``batch_size`` samples."""
        for i in range(0, len(self), batch_size):
            s = slice(i, i + batch_size)
            yield CalibSet(self.input_ids[s], self.masked[s], self.mask_ratio[s], self.key)


def resolve_source(cfg: CalibConfig, data_dir=None) -> Path:
    """The file a source names; a clear FileNotFoundError when it is absent."""
    if cfg.source in DATA_SOURCES:
        if data_dir is None:
            from qdlm_bench.evaluation.tasks import default_data_dir
            data_dir = default_data_dir()
        path = Path(data_dir) / DATA_SOURCES[cfg.source]
        hint = f"set eval.data_dir (or $QDLM_DATA_DIR) to the offline data folder, or calib.source to a local file"
    elif cfg.source in PROJECT_SOURCES:
        path, hint = PROJECT_SOURCES[cfg.source], "set calib.source to another source"
    else:
        path = Path(cfg.source).expanduser()
        hint = f"calib.source is a name ({sorted({**DATA_SOURCES, **PROJECT_SOURCES})}) or a .txt/.jsonl file"
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


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (fast tokenizers) or sorted vocabulary, with class and length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{len(tokenizer)}|{spec}".encode()).hexdigest()


def cache_key(cfg: CalibConfig, tokenizer, mask_token_id: int, path: Path) -> str:
    """Hash of the defining config, tokenizer fingerprint, source content and mask id."""
    parts = {"version": CACHE_VERSION, "cfg": cfg.defining(), "tokenizer": tokenizer_fingerprint(tokenizer),
             "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "mask_token_id": int(mask_token_id)}
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


def apply_masking(ids: torch.Tensor, ratios: torch.Tensor, mask_token_id: int, gen: torch.Generator):
    """Mask round(t * L) uniformly chosen positions of each row -> (masked ids, masked flags)."""
    n, length = ids.shape
    counts = (ratios * length).round().long()
    ranks = torch.rand(n, length, generator=gen).argsort(dim=1).argsort(dim=1)  # a random permutation per row
    masked = ranks < counts[:, None]
    return ids.masked_fill(masked, mask_token_id), masked


def build(cfg: CalibConfig | Mapping, tokenizer, mask_token_id: int, data_dir=None,
          cache_dir: str | Path | None = ".cache/calib") -> CalibSet:
    """The calibration set ``cfg`` defines, loaded from ``cache_dir`` when built before (None: no cache)."""
    cfg = cfg if isinstance(cfg, CalibConfig) else CalibConfig.from_dict(cfg)
    path = resolve_source(cfg, data_dir)
    key = cache_key(cfg, tokenizer, mask_token_id, path)
    file = Path(cache_dir) / f"{Path(cfg.source).stem}-{key[:16]}.pt" if cache_dir is not None else None
    if file is not None and file.is_file():
        log.info("calibration: loaded cached set %s", file)
        d = torch.load(file, weights_only=True)
        return CalibSet(d["input_ids"], d["masked"], d["mask_ratio"], key)
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = sample_windows(_tokenize(tokenizer, read_text(path, cfg.text_field)), cfg.n_samples, cfg.seqlen, gen, cfg.source)
    if cfg.masking == "random":
        ratios = draw_ratios(cfg.mask_ratio, cfg.n_samples, gen)
        ids, masked = apply_masking(ids, ratios, mask_token_id, gen)
    else:
        ratios, masked = torch.zeros(cfg.n_samples), torch.zeros_like(ids, dtype=torch.bool)
    calib = CalibSet(ids, masked, ratios, key)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        torch.save({"input_ids": ids, "masked": masked, "mask_ratio": ratios, "cfg": cfg.defining()}, tmp)
        os.replace(tmp, file)
        log.info("calibration: built %d x %d from %s, cached at %s", cfg.n_samples, cfg.seqlen, path, file)
    return calib
