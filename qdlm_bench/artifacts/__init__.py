"""Quantized artifacts: a quantization computed once, saved, and loaded by every later run.

``<root>/<quantization_key>/`` (``RunSpec.quantization_key``: model source, method and options,
calibration, bits and targets, dtype, seed; not the tasks or evaluation) holds:

* ``manifest.json``: the full quantization config (``RunSpec.quantization()``), the source
  checkpoint's identity, the package versions and the fingerprint of the quantization code, the
  model config, the format, the structure a method added (``structure.describe``: which paths are
  QuantLinears with which activation quantizer and online transform, K/V quantizers, a Q/K
  rotation, an untied head), how each quantized layer is stored, file and tensor sizes;
* ``model.safetensors``: every tensor of the quantized model, quantized weights as packed integer
  codes with float32 scales and integer zero points (``layout``; exact: ``codes``);
* ``config.json`` (compressed-tensors format only): the family's Hugging Face config with its
  ``quantization_config``.

Writing is atomic: everything goes into a temporary folder beside the final one, is fsynced, and
is renamed into place with the manifest already in it; a folder without a readable manifest, or
whose files do not match it, is never loaded (it is quantized again and replaced). One lock per key
(``store.file_lock``) makes two jobs needing the same artifact quantize it once: the second waits,
then loads. An artifact made by another package version or other quantization code
(``code_fingerprint``), or for another quantization config, is not loaded: it is recomputed and
replaced, with a log line saying why.

The root: ``artifacts:`` in conf/config.yaml; a relative path lives inside the result store
(``results/artifacts``), so a store and its artifacts go together; null or false disables
saving and loading. This module is torch-free; saving and loading import torch.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qdlm_bench import __version__
from qdlm_bench.digest import sources_digest
from qdlm_bench.store import collect_versions, file_lock

log = logging.getLogger("qdlm_bench")

FORMAT_VERSION = 1
MANIFEST, TENSORS, HF_CONFIG = "manifest.json", "model.safetensors", "config.json"
LOCK_DIR, TMP_PREFIX, OLD_PREFIX = ".locks", ".tmp-", ".old-"
DEFAULT_ROOT = "artifacts"
OFF = ("", "null", "none", "false", "off", "no")
# the code whose change changes a quantized model: the package's folders and modules below, and methods/
CODE_PARTS = ("quant", "calibration", "models", "zoo", "artifacts", "diffusion.py", "generation.py", "lazy.py")


class ArtifactError(ValueError):
    """A model or an artifact that cannot be saved or loaded as one; the message says why."""


def resolve_root(value: Any, store_root: str | os.PathLike) -> Path | None:
    """The artifacts folder of the ``artifacts:`` setting ``value``: None when disabled (null, false,
    ""), a relative path inside ``store_root``, an absolute one (or ``~/...``) as is."""
    if value is None or value is False or (isinstance(value, str) and value.strip().lower() in OFF):
        return None
    if value is True:
        value = DEFAULT_ROOT
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else Path(store_root) / path


def root_of(cfg: dict, store_root: str | os.PathLike | None = None) -> Path | None:
    """The artifacts folder of a run config (its ``artifacts`` inside ``store_root`` or its ``store``)."""
    return resolve_root(cfg.get("artifacts", DEFAULT_ROOT), cfg.get("store", "results") if store_root is None
                        else store_root)


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 (16 hex) of the source files that decide a quantized model (``CODE_PARTS`` of the
    package and ``methods/``): an artifact made by other code is not loaded."""
    package = Path(importlib.import_module("qdlm_bench").__file__).parent
    methods = Path(importlib.import_module("qdlm_bench.methods").__file__).parent
    files = [(f"methods/{p.relative_to(methods).as_posix()}", p) for p in methods.rglob("*.py")]
    for part in CODE_PARTS:
        path = package / part
        found = path.rglob("*.py") if path.is_dir() else [path] if path.is_file() else []
        files += [(p.relative_to(package).as_posix(), p) for p in found]
    return sources_digest(files)[:16]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """A folder of artifacts, one ``<quantization_key>/`` each."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        return self.root / key

    def lock(self, key: str):
        """The key's exclusive lock (``store.file_lock``); yields whether another holder was waited for."""
        return file_lock(self.root / LOCK_DIR / f"{key}.lock",
                         f"waiting for artifact {key} (another process is quantizing it)")

    def manifest(self, key: str) -> dict | None:
        """The manifest of ``key``'s folder, None when it has none that can be read."""
        try:
            manifest = json.loads((self.path_for(key) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def check(self, spec) -> tuple[dict | None, str | None]:
        """``(manifest, None)`` when the artifact of ``spec`` is complete and current; else ``(None,
        why)``, ``why`` None when there is no artifact at all."""
        key = spec.quantization_key()
        folder = self.path_for(key)
        if not folder.is_dir():
            return None, None
        manifest = self.manifest(key)
        if manifest is None:
            return None, f"{folder} has no readable {MANIFEST} (a write that did not finish)"
        if manifest.get("format_version") != FORMAT_VERSION or manifest.get("key") != key:
            return None, f"{folder}/{MANIFEST} is not a format-{FORMAT_VERSION} manifest of key {key}"
        if _canonical(manifest.get("quantization")) != _canonical(spec.quantization()):
            return None, f"{folder} holds another quantization (source checkpoint, method, bits or calibration differ)"
        made = (manifest.get("versions") or {}).get("qdlm_bench")
        if made != __version__:
            return None, f"{folder} was made by qdlm_bench {made}, this is {__version__}"
        if manifest.get("code") != code_fingerprint():
            return None, (f"{folder} was made by other quantization code (fingerprint {manifest.get('code')}, "
                          f"now {code_fingerprint()})")
        for name, size in (manifest.get("files") or {}).items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != size:
                return None, f"{path} is missing or not the size its manifest says ({size} bytes)"
        if TENSORS not in (manifest.get("files") or {}):
            return None, f"{folder}/{MANIFEST} lists no {TENSORS}"
        return manifest, None

    def find(self, spec, quiet: bool = False) -> dict | None:
        """The manifest of ``spec``'s usable artifact, or None (logging why an existing one is not used)."""
        manifest, why = self.check(spec)
        if why and not quiet:
            log.warning("not loading artifact %s: %s; quantizing again", spec.quantization_key(), why)
        return manifest

    def _clean(self, key: str) -> None:
        """Remove what killed writers of ``key`` left (call with the key's lock held)."""
        for leftover in [*self.root.glob(f"{TMP_PREFIX}{key}-*"), *self.root.glob(f"{OLD_PREFIX}{key}-*")]:
            shutil.rmtree(leftover, ignore_errors=True)

    def save(self, spec, model, info: dict | None = None, quantize_s: float | None = None) -> dict:
        """Write the quantized ``model`` of ``spec`` as its artifact (replacing an unusable one) and
        return its manifest. Call with the key's lock held. Raises ``ArtifactError`` for a model the
        format cannot describe (nothing is written then)."""
        from safetensors.torch import save_file

        from qdlm_bench.models.checkpoint import config_to_hf

        from . import layout
        from .structure import describe

        key = spec.quantization_key()
        structure = describe(model)
        fmt, tensors, layers, shared, qconfig, why_not = layout.build(model, spec.quant, structure)
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean(key)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key}-", dir=self.root))
        old = None
        try:
            os.chmod(tmp, 0o777 & ~_umask())
            ident = uuid.uuid4().hex
            save_file(tensors, tmp / TENSORS, {"format": "pt", "artifact_id": ident, "artifact_format": fmt})
            if qconfig is not None:
                hf = {**config_to_hf(model.config), "torch_dtype": spec.dtype, "quantization_config": qconfig}
                (tmp / HF_CONFIG).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
            quantization = spec.quantization()
            packed = [n for n, layer in layers.items() if layer["storage"] == layout.PACKED]
            manifest = {
                "format_version": FORMAT_VERSION, "id": ident, "key": key,
                "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "format": fmt, "format_note": why_not and f"not compressed-tensors: {why_not}",
                "quantization": quantization, "source": quantization["model"].get("source"),
                "versions": collect_versions(), "code": code_fingerprint(),
                "model_config": model.config.to_dict(), "dtype": spec.dtype,
                "structure": structure, "layers": layers, "shared": shared, "quantization_config": qconfig,
                "method_info": json.loads(json.dumps(info or {}, default=str)), "quantize_s": quantize_s,
                "files": files,
                "sizes": {"artifact_bytes": sum(files.values()), "tensor_bytes": layout.tensor_bytes(tmp / TENSORS),
                          "fp_bytes": layout.planned_bytes(model.config, spec.quant, spec.dtype, fmt)["fp"],
                          "packed_layers": len(packed), "dense_layers": len(layers) - len(packed)},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # last: its presence = complete
            for p in tmp.iterdir():
                _fsync(p)
            _fsync(tmp)
            final = self.path_for(key)
            if final.exists():  # an unusable artifact (or force): moved aside, then replaced
                old = self.root / f"{OLD_PREFIX}{key}-{ident}"
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return manifest

    def load(self, spec, device: str | None = None, manifest: dict | None = None):
        """``(model, tokenizer, manifest)``: the quantized model of ``spec`` rebuilt from its artifact
        on ``device`` (default ``spec.device``), in eval mode. Raises ``ArtifactError`` when there is
        no usable artifact or its files do not match its manifest."""
        import torch
        from safetensors import safe_open
        from safetensors.torch import load_file

        from qdlm_bench.models.checkpoint import empty_model
        from qdlm_bench.models.config import DLLMConfig

        from . import layout
        from .structure import apply, describe

        key = spec.quantization_key()
        manifest = manifest or self.find(spec)
        if manifest is None:
            raise ArtifactError(f"no usable artifact {key} in {self.root}")
        folder = self.path_for(key)
        device = device or spec.device
        with safe_open(folder / TENSORS, "pt") as f:
            ident = (f.metadata() or {}).get("artifact_id")
        if ident != manifest["id"]:
            raise ArtifactError(f"{folder}/{TENSORS} (id {ident}) is not the file of its manifest ({manifest['id']})")
        tensors = load_file(folder / TENSORS, device=str(device))
        cfg = DLLMConfig(**manifest["model_config"])
        dtype = getattr(torch, manifest["dtype"])
        state = layout.unpack(tensors, manifest["format"], cfg, manifest["layers"], dtype, manifest["shared"])
        del tensors
        model = empty_model(cfg, dtype, device)
        apply(model, manifest["structure"], state)
        model.load_state_dict(state, strict=True)
        if describe(model) != manifest["structure"]:
            raise ArtifactError(f"{folder}: the rebuilt model's structure differs from its manifest's")
        return model.eval(), tokenizer_for(spec.model), manifest

    def has(self, spec) -> bool:
        """Whether ``spec``'s quantized model is saved here, complete and current (reads only JSON)."""
        return self.check(spec)[0] is not None


def tokenizer_for(preset: dict):
    """The tokenizer ``models.factory.load_fp_model`` gives ``preset``, without loading weights."""
    if preset.get("tokenizer") == "byte":
        from qdlm_bench.models.tokenizer import byte_tokenizer

        return byte_tokenizer()
    from qdlm_bench.models.checkpoint import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve(preset.get("path") or preset["hub_id"]))
    if tokenizer is None:
        raise ValueError(f"model {preset.get('name')!r} has no tokenizer files; add them to its folder "
                         "or set model.tokenizer=byte")
    return tokenizer


__all__ = ["DEFAULT_ROOT", "FORMAT_VERSION", "ArtifactError", "ArtifactStore", "code_fingerprint", "resolve_root",
           "root_of", "tokenizer_for"]
