"""Content digests of files: what identifies a checkpoint or a task's data in a record key.

``file_digest`` reads every byte (sha256) once per file version: the result is kept for the
process and on disk (``$XDG_CACHE_HOME/qdlm-bench/digests.json``), keyed by the file's real path,
size, mtime and inode, so a 16 GB checkpoint is read once (about 10-30 s) and then costs a stat.
A file changed in place keeps none of these only if its mtime is forged; a copy always hashes anew.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHUNK = 1 << 20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "special_tokens_map.json")
_MEMORY: dict[str, str] = {}


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "qdlm-bench" / "digests.json"


def _load_disk() -> dict[str, str]:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_disk(entries: dict[str, str]) -> None:
    """Merge ``entries`` into the disk cache (best effort, atomic replace)."""
    file = cache_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        merged = _load_disk() | entries
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, sort_keys=True))
        os.replace(tmp, file)
    except OSError:  # an unwritable cache only costs the hash next time
        pass


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes; a folder: of its files' relative paths and digests."""
    path = Path(path).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return object_digest({str(p.relative_to(path)): file_digest(p) for p in files})
    key = _stat_key(path)
    if key not in _MEMORY:
        stored = _load_disk().get(key) if path.stat().st_size >= CHUNK else None
        if stored is None:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    digest.update(chunk)
            stored = digest.hexdigest()
            if path.stat().st_size >= CHUNK:  # small files are cheaper to hash than to look up
                _save_disk({key: stored})
        _MEMORY[key] = stored
    return _MEMORY[key]


def sources_digest(files) -> str:
    """sha256 (hex) of source files, each ``(name, path)`` (in name order) by its name and its bytes:
    what says that code changed (an artifact's, a request cache's)."""
    digest = hashlib.sha256()
    for name, path in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


def object_digest(obj) -> str:
    """sha256 (hex) of a JSON-able object's canonical text."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_fingerprint(folder: str | Path) -> str:
    """Identifies a local checkpoint by content, not location: the full digests of its config.json,
    every weight file (``*.safetensors``, ``*.bin``) and its tokenizer files, by file name."""
    folder = Path(folder).expanduser()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin") or p.name in TOKENIZER_FILES or p.name == "config.json"))
    parts = {p.name: file_digest(p) for p in files}
    return "local:" + object_digest(parts)[:16]
