"""Load and save dLLMs in their families' real Hugging Face layout (config.json + safetensors).

A family module (``llada``, ``dream``) supplies only what is its own: ``matches(hf)``,
``config_from_hf`` / ``config_to_hf`` and the key names ``TOP``, ``BLOCK_PREFIX``, ``BLOCK``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DLLMConfig
from .layout import FAMILIES, INDEX, detect_family, key_map  # noqa: F401  (torch-free; re-exported)
from .layout import check, family_module as _family
from .transformer import DiffusionLM

log = logging.getLogger(__name__)

_DTYPE_KEYS = ("torch_dtype", "dtype")  # written from the model's dtype when saving
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.tiktoken"]
_MISSING = object()


class ModelNotFoundError(FileNotFoundError):
    """The model source is neither a local checkpoint folder nor downloadable now."""


def config_from_hf(hf: dict, family: str | None = None) -> DLLMConfig:
    """DLLMConfig of a config.json dict; fields that ``config_to_hf`` would not reproduce are
    kept in ``extra`` so saving writes them back."""
    fam = _family(family or detect_family(hf))
    cfg = fam.config_from_hf(hf)
    written = fam.config_to_hf(cfg)
    cfg.extra = {k: v for k, v in hf.items() if k not in _DTYPE_KEYS and written.get(k, _MISSING) != v}
    return cfg


def config_to_hf(cfg: DLLMConfig) -> dict:
    """The family's real config.json dict for ``cfg``."""
    return {**_family(cfg.family).config_to_hf(cfg), **cfg.extra}


def empty_model(cfg: DLLMConfig, dtype: torch.dtype = torch.float32, device="cpu") -> DiffusionLM:
    """An uninitialised DiffusionLM, allocated once, directly in ``dtype`` on ``device``."""
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def resolve(source: str | Path, revision: str | None = None) -> Path:
    """The local folder of ``source``: the folder itself, or a hub snapshot (cached or downloaded)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1:
        raise ModelNotFoundError(f"local model folder {text} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # offline, no connection, unknown repo, bad id: one answer
        offline = " offline" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise ModelNotFoundError(
            f"{text!r} is not a local folder and cannot be downloaded{offline} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); download it where "
            f"you are online (huggingface-cli download {text} --local-dir <path>) and pass "
            f"model.path=<path>") from e


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (the shards of its index, or the one file)."""
    index = folder / INDEX
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise ModelNotFoundError(f"local folder {folder} has neither model.safetensors nor {INDEX}")


def load_weights(model: DiffusionLM, folder: Path) -> None:
    """Copy a checkpoint's tensors into ``model``, one shard (and one tensor) at a time."""
    files = weight_files(folder)
    ours = {real: name for name, real in key_map(model.config).items()}
    stored = set()
    for f in files:
        with safe_open(f, "pt") as sf:
            stored.update(sf.keys())
    missing, unexpected = sorted(set(ours) - stored), sorted(stored - set(ours))
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match its {model.config.family} config: "
                         f"{len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for f in files:
            with safe_open(f, "pt") as sf:
                for real in sf.keys():
                    p, t = params[ours[real]], sf.get_tensor(real)
                    if p.shape != t.shape:
                        raise ValueError(f"{real} in {f.name} has shape {tuple(t.shape)}, "
                                         f"the config expects {tuple(p.shape)}")
                    p.copy_(t)


def load_tokenizer(folder: Path):
    """The folder's tokenizer (``AutoTokenizer``), or None when it has no tokenizer files."""
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        log.info("no tokenizer files in %s; loading the model without a tokenizer", folder)
        return None
    from transformers import AutoTokenizer, PretrainedConfig

    # an empty config: transformers does not know model_type llada/Dream and would warn
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True, config=PretrainedConfig())


def load_model(source: str | Path, family: str | None = None, dtype: torch.dtype = torch.bfloat16,
               device="cpu", revision: str | None = None):
    """``(DiffusionLM, tokenizer or None)`` from a local checkpoint folder or a hub id.

    ``family`` overrides detection from config.json (e.g. a Qwen2 checkpoint read as Dream).
    """
    folder = resolve(source, revision)
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"local folder {folder} has no config.json")
    check(folder, family)  # config, shards, whole files, tensor names and shapes: a clear CheckpointError
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), family)
    model = empty_model(cfg, dtype, device)
    load_weights(model, folder)
    return model, load_tokenizer(folder)


def _shards(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_model(model: DiffusionLM, folder: str | Path, tokenizer=None,
               shard_size_bytes: int | None = None) -> Path:
    """Write ``model`` as its family's real checkpoint: config.json and safetensors under the
    real key names, sharded with an index when ``shard_size_bytes`` is given (+ the tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("model*.safetensors"), folder / INDEX]:
        old.unlink(missing_ok=True)
    cfg = model.config
    hf = {**config_to_hf(cfg), "torch_dtype": str(model.dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")

    params = dict(model.named_parameters())
    tensors = {real: params[ours].detach() for ours, real in key_map(cfg).items()}
    meta = {"format": "pt"}
    if shard_size_bytes is None:
        save_file({k: t.contiguous().cpu() for k, t in tensors.items()}, folder / "model.safetensors", meta)
    else:
        shards = _shards(tensors, shard_size_bytes)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: t.contiguous().cpu() for k, t in shard.items()}, folder / name, meta)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
