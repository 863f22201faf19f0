"""A checkpoint folder read without torch: its families, key names, weight files, and ``check``, the
configuration check's look at a local checkpoint (before any weights load).

``check(folder, family)`` reads only config.json, the shard index and each safetensors file's
header (8 bytes of little-endian header length, then that much JSON): the family is known and our
model code can build its config; every file the index names is there; every file is as long as its
header says (a truncated copy of a 16 GB checkpoint fails in milliseconds, no tensor is read); the
tensors stored are exactly those of the config, with its shapes. Each problem is a
``CheckpointError`` naming the file and the fix.
"""

from __future__ import annotations

import functools
import json
import struct
from pathlib import Path

from . import dream, llada
from .config import DLLMConfig

FAMILIES = {"llada": llada, "dream": dream}
INDEX = "model.safetensors.index.json"
# model_types that a family reads when the preset names it (a Qwen2 checkpoint read as Dream)
READ_AS = {"dream": ("qwen2",), "llada": ()}
_ARCHITECTURES = {"llada": "model_type llada / architectures LLaDAModelLM",
                  "dream": "model_type Dream / architectures DreamModel"}


class CheckpointError(ValueError):
    """A local checkpoint folder that cannot be loaded; the message names the file and the fix."""


def family_module(name: str):
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def detect_family(hf: dict) -> str:
    """The family of a config.json dict, from its ``model_type`` / ``architectures``."""
    for name, fam in FAMILIES.items():
        if fam.matches(hf):
            return name
    raise ValueError(f"cannot tell the model family of model_type={hf.get('model_type')!r}, "
                     f"architectures={hf.get('architectures')}; pass family= one of {sorted(FAMILIES)}")


def key_map(cfg: DLLMConfig) -> dict[str, str]:
    """Our state_dict key -> the family's checkpoint key, for every stored tensor (a tied LM
    head is not stored)."""
    fam = family_module(cfg.family)
    biased = ("q_proj", "k_proj", "v_proj") if cfg.qkv_bias else ()
    out = {"embed.weight": f"{fam.TOP['embed']}.weight"}
    for i in range(cfg.n_layers):
        prefix = fam.BLOCK_PREFIX.format(i=i)
        for ours, theirs in fam.BLOCK.items():
            for p in ("weight", "bias") if ours in biased else ("weight",):
                out[f"blocks.{i}.{ours}.{p}"] = f"{prefix}{theirs}.{p}"
    out["norm.weight"] = f"{fam.TOP['norm']}.weight"
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = f"{fam.TOP['lm_head']}.weight"
    return out


def shapes(cfg: DLLMConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of ``key_map(cfg)``, by our key."""
    d, q, kv, ff, v = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.d_ff, cfg.vocab_size
    block = {"attn_norm.weight": (d,), "q_proj.weight": (q, d), "q_proj.bias": (q,), "k_proj.weight": (kv, d),
             "k_proj.bias": (kv,), "v_proj.weight": (kv, d), "v_proj.bias": (kv,), "o_proj.weight": (d, q),
             "mlp_norm.weight": (d,), "gate_proj.weight": (ff, d), "up_proj.weight": (ff, d), "down_proj.weight": (d, ff)}
    top = {"embed.weight": (v, d), "norm.weight": (d,), "lm_head.weight": (v, d)}
    return {ours: top[ours] if ours in top else block[ours.split(".", 2)[2]] for ours in key_map(cfg)}


def linear_inputs(cfg: DLLMConfig) -> dict[str, int]:
    """The input width of each linear of a block (short names) and of the LM head: what weight
    groups split."""
    q = cfg.n_heads * cfg.head_dim
    widths = dict.fromkeys(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), cfg.d_model)
    return {**widths, "o_proj": q, "down_proj": cfg.d_ff, "lm_head": cfg.d_model}


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file (tensor name -> dtype, shape, data_offsets), read alone;
    CheckpointError when the file is not whole (shorter or longer than its header says)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes); copy it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path} is truncated or not a safetensors file: its header claims {n} bytes, "
                                  f"the file has {size}; copy it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} has an unreadable safetensors header ({err}); copy it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has an unreadable safetensors header; copy it again")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path} has an unreadable safetensors header (no data_offsets); copy it again") from None
    if 8 + n + end != size:
        state = "truncated" if 8 + n + end > size else "longer than its header says"
        raise CheckpointError(f"{path} is {state}: {size} bytes, its header describes {8 + n + end}; "
                              "copy (or download) it again")
    return tensors


def _read_config(folder: Path, family: str | None) -> DLLMConfig:
    path = folder / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); copy the checkpoint's config.json again") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path} is not a JSON object; copy the checkpoint's config.json again")
    supported = "; ".join(f"{k}: {v}" for k, v in _ARCHITECTURES.items())
    try:
        detected = detect_family(hf)
    except ValueError:
        detected = None
    name = family or detected
    if detected is not None and family is not None and detected != family:
        raise CheckpointError(f"{path} is a {detected} checkpoint ({_ARCHITECTURES[detected]}), not {family}: "
                              f"set model.family={detected} (or use a {detected} model preset)")
    if detected is None and str(hf.get("model_type", "")).lower() not in READ_AS.get(name, ()):
        raise CheckpointError(f"{path}: unsupported architecture (model_type={hf.get('model_type')!r}, "
                              f"architectures={hf.get('architectures')}); supported: {supported}")
    try:
        return family_module(name).config_from_hf(hf)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        why = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        seen = f" (it looks like a {detected} checkpoint)" if detected and detected != name else ""
        raise CheckpointError(f"{path} cannot be read as a {name} model{seen}: {why}; "
                              f"supported: {supported}") from None


def _stat(folder: Path) -> tuple:
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file())


def check(folder: str | Path, family: str | None = None) -> DLLMConfig:
    """The checkpoint's DLLMConfig after the cheap checks of this module's docstring (cached by the
    folder's file names, sizes and mtimes); CheckpointError naming the problem."""
    folder = Path(folder).expanduser()
    return _check(str(folder), family, _stat(folder))


@functools.lru_cache(maxsize=64)
def _check(folder: str, family: str | None, _signature: tuple) -> DLLMConfig:
    root = Path(folder)
    cfg = _read_config(root, family)
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is unreadable ({type(err).__name__}: {err}); copy it again") from None
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} names {len(missing)} weight file(s) absent from {root}: {missing[:5]}; "
                                  "copy (or download) every shard")
        files = [root / n for n in names]
    elif (root / "model.safetensors").is_file():
        files = [root / "model.safetensors"]
    else:
        raise CheckpointError(f"model.path={root} has neither model.safetensors nor {INDEX}: point it at a "
                              "checkpoint folder (config.json, tokenizer files, *.safetensors)")
    stored: dict[str, tuple] = {}
    for f in files:
        stored.update({k: tuple(v.get("shape", ())) for k, v in safetensors_header(f).items()})
    expected = {real: shapes(cfg)[ours] for ours, real in key_map(cfg).items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {root} does not match its config.json ({cfg.family}, {cfg.n_layers} "
                              f"layers): {len(missing)} missing tensors {missing[:3]}, {len(unexpected)} "
                              f"unexpected {unexpected[:3]}")
    wrong = [(k, stored[k], expected[k]) for k in expected if stored[k] != expected[k]]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"checkpoint {root} does not match its config.json: {len(wrong)} tensor(s) of "
                              f"another shape, e.g. {k} is {list(got)}, the config needs {list(want)}")
    return cfg
