"""Result records: one pretty-printed JSON file per run, keyed by a hash of the semantic spec.

A record's ``key`` hashes its whole ``spec``; its ``baseline_key`` hashes only the fields an FP
run shares with every quantized run of the same study (model, tasks, eval, dtype, seed), so
tables find the FP baseline of any record. Its ``precision`` holds the fields of its bit string as
``QuantSpec.parse`` reads them, so reports never parse bits; a record older than that field gets it
when read. Writes are atomic: a reader sees the old file or the new one, never a partial one.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import subprocess
import tempfile
import warnings
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from qdlm_bench import __version__
from qdlm_bench.quant.spec import QuantSpec, QuantSpecError

log = logging.getLogger("qdlm_bench")

BASELINE_FIELDS = ("model", "tasks", "eval", "dtype", "seed")
_DERIVED = ("key", "baseline_key", "spec", "precision")  # new_record computes these; callers cannot set them
RECORD_DEFAULTS: dict[str, Any] = {
    "sweep": None, "status": "done", "error": None, "fault": None, "metrics": {}, "timings": {}, "device": None,
}
LOCK_DIR = ".locks"
STATUSES = ("done", "failed")


class StoreError(ValueError):
    """The result store cannot be used (a file, not a folder; not writable); the message says the fix."""


class CorruptRecordError(ValueError):
    """A record file exists but is not a readable record; the message names the path and the fix."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"unreadable result record {path}: {reason}; delete the file, or rerun with "
                         "force=true to replace it")


class CorruptRecordWarning(UserWarning):
    """``ResultStore.records`` skipped an unreadable record file."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _hash(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:16]


def spec_key(spec: dict) -> str:
    """First 16 hex digits of the sha256 of the spec's canonical JSON (key order is irrelevant)."""
    return _hash(spec)


def baseline_key(spec: dict) -> str:
    """Key shared by the FP run and every quantized run of the same model/tasks/eval/dtype/seed."""
    missing = [f for f in BASELINE_FIELDS if f not in spec]
    if missing:
        raise ValueError(f"spec lacks baseline field(s) {missing}; needs all of {BASELINE_FIELDS}")
    return _hash({f: spec[f] for f in BASELINE_FIELDS})


def _name(section: Any) -> Any:
    """The name of a spec section: {"name": ...} dicts give their ``label`` (a variant's name in
    tables, e.g. an ablation rung) or else their name; plain values themselves."""
    return (section.get("label") or section.get("name")) if isinstance(section, dict) else section


def precision(spec: dict) -> dict:
    """The bit fields (``QuantSpec.grammar_fields``) of the spec's bits, parsed; ``group_size``
    None = per output channel. An FP run (method "fp", or no bits) gets QuantSpec's full precision:
    w_bits = a_bits = kv_bits = 16, group_size None, w_sym False."""
    bits = (spec.get("quant") or {}).get("bits")
    quant = QuantSpec.parse("fp" if bits is None or _name(spec.get("method")) == "fp" else bits)
    return quant.grammar_fields()


FP_PRECISION = precision({})


@functools.lru_cache(maxsize=1)
def _git_sha() -> str | None:
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / ".git").exists():  # installed: no commit to name (never another repo's)
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def collect_versions() -> dict[str, str | None]:
    """Versions of the packages that decide a result, plus the repo's git sha (None if unknown)."""
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"qdlm_bench": __version__, "torch": version("torch"),
            "transformers": version("transformers"), "lm_eval": version("lm_eval"),
            "python": platform.python_version(), "git_sha": _git_sha()}


def new_record(spec: dict, **fields: Any) -> dict:
    """A result record for `spec`; `fields` (status, error, metrics, timings, sweep, device, ...)
    override the defaults. key, baseline_key and spec always come from `spec`."""
    bad = [f for f in fields if f in _DERIVED]
    if bad:
        raise ValueError(f"{bad} are derived from the spec and cannot be passed to new_record")
    record = {
        "key": spec_key(spec), "baseline_key": baseline_key(spec), "spec": spec,
        "model": _name(spec.get("model")), "method": _name(spec.get("method")),
        "bits": (spec.get("quant") or {}).get("bits"), "precision": precision(spec),
        **RECORD_DEFAULTS,
        "dtype": spec.get("dtype"), "seed": spec.get("seed"),
        "versions": collect_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }
    record.update(fields)
    if record["status"] not in STATUSES:
        raise ValueError(f"status must be 'done' or 'failed', got {record['status']!r}")
    return record


class ResultStore:
    """A folder of records, one `<key>.json` per run. ``skipped``: {path: reason} of the unreadable
    record files ``records`` has met."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.skipped: dict[Path, str] = {}

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def check_writable(self) -> None:
        """Make sure records can be written under ``root`` (creating the folder): raise StoreError
        when it is a file or cannot be created or written (a probe file is created and removed)."""
        fix = "pass store=<a writable folder>"
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"result store {self.root} is a file, not a folder; move the file away or {fix}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the result store folder {self.root}: {err.strerror or err}; "
                             f"{fix}") from None
        try:
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".probe.", suffix=".tmp")
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise StoreError(f"cannot write to the result store {self.root}: {err.strerror or err}; "
                             f"fix its permissions or {fix}") from None

    def load(self, path: str | os.PathLike) -> dict:
        """The record at `path`, with its ``precision`` filled in when it predates that field;
        CorruptRecordError if it cannot be read or is not a record."""
        path = Path(path)
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CorruptRecordError(path, f"invalid JSON ({err})") from None
        except (OSError, UnicodeDecodeError) as err:
            raise CorruptRecordError(path, f"cannot be read ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("spec"), dict) or "key" not in record:
            raise CorruptRecordError(path, "not a result record (a JSON object with key and spec)")
        try:
            key = spec_key(record["spec"])
        except (TypeError, ValueError) as err:
            raise CorruptRecordError(path, f"its spec cannot be hashed ({err})") from None
        if record["key"] != key:
            raise CorruptRecordError(path, f"its key {record['key']!r} is not the hash of its spec ({key})")
        if record.get("status", "done") not in STATUSES:
            raise CorruptRecordError(path, f"status {record.get('status')!r} is not one of {STATUSES}")
        if "precision" not in record:
            try:
                record["precision"] = precision(record["spec"])
            except (QuantSpecError, AttributeError, TypeError) as err:
                raise CorruptRecordError(path, f"its bits cannot be read ({err})") from None
        return record

    def _read(self, path: Path) -> dict | None:
        """``load(path)``, or None with a CorruptRecordWarning (and ``skipped[path]``)."""
        try:
            return self.load(path)
        except CorruptRecordError as err:
            self.skipped[path] = err.reason
            warnings.warn(f"skipping {path}: {err.reason}", CorruptRecordWarning, stacklevel=3)
            return None

    def get(self, key: str) -> dict | None:
        """The record of `key`, None when there is none; CorruptRecordError when its file is unreadable."""
        path = self.path_for(key)
        if not path.exists():
            return None
        record = self.load(path)
        if record["key"] != key:  # e.g. another record copied under this name
            raise CorruptRecordError(path, f"it holds the record of key {record['key']}, not {key}")
        return record

    def is_done(self, key: str) -> bool:
        record = self.get(key)
        return record is not None and record.get("status") == "done"

    def lock(self, key: str):
        """Hold the exclusive lock of `key` (``file_lock`` on ``<root>/.locks/<key>.lock``, across
        processes); yields whether another holder had to be waited for."""
        return file_lock(self.root / LOCK_DIR / f"{key}.lock", f"waiting for {key} (another process is running it)")

    def write(self, record: dict, replace_corrupt: bool = False) -> Path:
        """Atomically write `record`, group-readable, replacing an earlier record of the same spec;
        an unreadable file under its key raises CorruptRecordError unless ``replace_corrupt``."""
        key = record.get("key")
        if "spec" not in record or key != spec_key(record["spec"]):
            raise ValueError(f"record key {key!r} is not the spec_key of its spec")
        try:
            previous = self.get(key)
        except CorruptRecordError:
            if not replace_corrupt:
                raise
            previous = None
        if previous is not None and _canonical(previous["spec"]) != _canonical(record["spec"]):
            raise ValueError(f"key collision: {self.path_for(key)} holds a different spec")
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{key}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide records from the group
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=2, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def records(self, **where: Any) -> list[dict]:
        """Readable records, sorted by creation time, whose top-level fields match `where`:
        each value is one allowed value or a list/tuple/set of them; None means no filter.
        Unreadable files are skipped with a CorruptRecordWarning and listed in ``skipped``."""
        found = []
        for path in sorted(self.root.glob("*.json")):
            record = self._read(path)
            if record is not None and all(_matches(record.get(f), v) for f, v in where.items()):
                found.append(record)
        return sorted(found, key=lambda r: str(r.get("created", "")))


@contextmanager
def file_lock(path: str | os.PathLike, waiting: str) -> Iterator[bool]:
    """Hold the exclusive ``flock`` of ``path`` (created, group-readable under the umask, with its
    folder), logging ``waiting`` when another process holds it; yields whether it had to be waited
    for. Released on exit, or by the kernel when the process dies (a dead holder never blocks).
    The descriptor is closed on exec (subprocesses never hold it), but a child forked without exec
    while the lock is held shares it until it exits. ``ResultStore.lock`` (records) and
    ``artifacts.ArtifactStore.lock`` (quantized models) are this lock on their own files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            log.info("%s", waiting)
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        yield waited
    finally:
        os.close(fd)  # releases the lock


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _matches(value: Any, allowed: Any) -> bool:
    if allowed is None:
        return True
    if isinstance(allowed, (list, tuple, set, frozenset)):
        return value in allowed
    return value == allowed
