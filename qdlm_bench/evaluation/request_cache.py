"""The request cache: every finished batch of an evaluation persists as it completes, so that a
job killed inside a task resumes where it stopped (``eval.request_cache``, default on).

What is cached is a *batch* of the plan an uninterrupted run computes (``diffusion.loglikelihood``:
a forward pass of Monte-Carlo rows → their losses; ``diffusion.generate``: a batch of prompts → its
tokens and the generator state after it), keyed by everything it reads: its padded token ids,
masks, sampler settings and, for generation, the generator state before it. A resumed run walks
the same plan; a batch found is read back instead of computed (generation restores the generator
state, so the next batches draw what they would have), and the final metrics are bit-equal to an
uninterrupted run's. Caching whole requests instead would not be exact: a batched forward's floats
can depend on the batch's other rows, and generation's random stream runs across batches.

lm-eval's own ``use_cache`` (CachingLM over SqliteDict) writes a request type's results only
after the whole ``loglikelihood``/``generate_until`` call returns; the adapter handles all of a
task's requests in one such call, so a kill inside a task would lose the whole task.

Layout: ``<store>/request_cache/<namespace>/<task>.sqlite``. The namespace (16 hex digits; each
database's ``meta`` table describes it) is a hash of the quantized model
(``RunSpec.quantization_key``), dtype, device type and name, torch version and the source of the
code that computes a batch or the quantized model (``diffusion``, ``generation``, ``decoders``,
``models``, ``quant``, ``methods``, ``calibration``: a fixed method must not be served its old
results): a cache of another model, precision, device or code never serves a run; each database also
records its namespace and is refused when it differs. Each batch is one SQLite transaction,
committed as it completes: a killed process (SIGKILL, OOM, a SLURM time limit) loses no finished
batch. Commits are not synced to disk (``synchronous=OFF``: 0.3 ms a batch here, against 20 ms with
a sync): a crash of the whole machine may corrupt the file, which is then rebuilt (below). The
rollback journal, not WAL, is used: WAL needs every process of a database on one host, while a SLURM
sweep's ``store`` is shared by nodes; concurrent jobs take turns through SQLite's file locks (a
writer waits up to ``BUSY_TIMEOUT_S``), which a network filesystem must support (NFSv4 does).

The cache only saves time, so no trouble with it fails a run. An unusable database (truncated,
not SQLite, another namespace or format) is moved aside (``<file>.broken-<ns>``, kept for
inspection) with a warning and an empty one is started: its batches are recomputed; a row whose
checksum fails is recomputed; a database that cannot be opened or written (locked for more than
``BUSY_TIMEOUT_S``, read-only, disk full) is warned about and the task goes on without it.
Clear a model's cache by deleting its folder; disable it (neither read nor written) with
``eval.request_cache=false``: ``force=true`` reruns a run but still reads the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from qdlm_bench import calibration, decoders, diffusion, generation, methods, models, quant
from qdlm_bench.digest import sources_digest
from qdlm_bench.store import spec_key

log = logging.getLogger(__name__)

CACHE_DIR = "request_cache"
FORMAT = 1  # the layout of a database and of its values
BUSY_TIMEOUT_S = 120.0
# what computes a batch, and the quantized model it runs (``quantization_key`` names no code)
_CODE = (diffusion, generation, decoders, models, quant, methods, calibration)


# errors of a database that is sound but cannot be used now (else the file is moved aside)
UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_FULL",
               "SQLITE_PROTOCOL")


class UnusableCache(Exception):
    """A cache database that cannot be used (corrupt, or of another namespace)."""


def unavailable(err: sqlite3.Error) -> bool:
    """Is ``err`` one of a sound database that cannot be used now (``UNAVAILABLE``)?"""
    return str(getattr(err, "sqlite_errorname", "")).startswith(UNAVAILABLE)


def code_digest() -> str:
    """sha256 of the sources of the modules and packages in ``_CODE``."""
    files = []
    for module in _CODE:
        root = Path(module.__file__)
        found = root.parent.rglob("*.py") if root.name == "__init__.py" else [root]
        files += [(f.relative_to(root.parent.parent).as_posix(), f) for f in found]
    return sources_digest(files)


def describe(quantization_key: str, dtype: str, device: str) -> dict:
    """What a cached batch's value depends on besides its content (hashed into the namespace)."""
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"format": FORMAT, "quantization_key": quantization_key, "dtype": str(dtype), "device": dev.type,
            "device_name": name, "torch": torch.__version__, "code": code_digest()}


def content_key(kind: str, content) -> str:
    """sha256 of a batch's ``kind`` and ``content`` (tensors by dtype, shape and bytes; lists,
    tuples, dicts, str, int, float, bool and None by value, unambiguously)."""
    h = hashlib.sha256(f"{kind}|".encode())
    _feed(h, content)
    return h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update(f"seq {len(obj)}|".encode())
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, dict):
        h.update(f"map {len(obj)}|".encode())
        for k in sorted(obj):
            _feed(h, k)
            _feed(h, obj[k])
    elif obj is None or isinstance(obj, (str, int, float, bool)):
        h.update(f"{type(obj).__name__} {obj!r}|".encode())
    else:
        raise TypeError(f"cannot key a batch on a {type(obj).__name__}")


class TaskCache:
    """One task's batches in one SQLite file (``diffusion.BatchCache``); counts hits and misses.
    Opening raises sqlite3.Error when the file cannot be used now (``unavailable``), OSError when
    its folder cannot be written; an error while
    reading or writing later is warned about once, and the cache then serves and keeps nothing."""

    def __init__(self, path: Path, namespace: dict):
        self.path, self.namespace, self.described = Path(path), spec_key(namespace), json.dumps(namespace, sort_keys=True)
        self.hits = self.misses = 0
        try:
            self.conn = self._connect()
        except (sqlite3.DatabaseError, UnusableCache) as err:
            if isinstance(err, sqlite3.Error) and unavailable(err):
                raise
            aside = self.path.with_name(f"{self.path.name}.broken-{time.time_ns()}")
            log.warning("request cache %s is unusable (%s); moved it to %s and starting an empty one "
                        "(its batches are recomputed)", self.path, err, aside)
            self._move_aside(aside)
            self.conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)  # autocommit
        try:
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA synchronous=OFF")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise UnusableCache(f"integrity check: {check}")
            conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS batches "
                         "(key TEXT PRIMARY KEY, value TEXT NOT NULL, checksum TEXT NOT NULL)")
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('namespace', ?), ('format', ?), ('describe', ?)",
                         (self.namespace, str(FORMAT), self.described))
            meta = dict(conn.execute("SELECT name, value FROM meta WHERE name IN ('namespace', 'format')"))
            if meta != {"namespace": self.namespace, "format": str(FORMAT)}:
                raise UnusableCache(f"it belongs to namespace {meta.get('namespace')} (format {meta.get('format')}), "
                                    f"not {self.namespace} (format {FORMAT})")
        except BaseException:
            conn.close()
            raise
        return conn

    def _move_aside(self, aside: Path) -> None:
        for suffix in ("", "-journal"):
            try:
                self.path.with_name(self.path.name + suffix).replace(aside.with_name(aside.name + suffix))
            except FileNotFoundError:  # no journal, or another process moved it first
                pass

    def __len__(self) -> int:
        row = self._run("SELECT count(*) FROM batches")
        return row[0] if row else 0

    def key(self, kind: str, content) -> str:
        return content_key(kind, content)

    def get(self, key: str):
        """The stored value of ``key`` (None if absent or its checksum fails: then recomputed)."""
        row = self._run("SELECT value, checksum FROM batches WHERE key = ?", key)
        if row is not None and row[1] != _checksum(key, row[0]):
            log.warning("request cache %s: batch %s fails its checksum; recomputing it", self.path, key[:16])
            row = None
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return json.loads(row[0])

    def put(self, key: str, value) -> None:
        """Store ``value`` (JSON: floats round-trip exactly) under ``key``, committed at once."""
        text = json.dumps(value)
        self._run("INSERT OR REPLACE INTO batches VALUES (?, ?, ?)", key, text, _checksum(key, text))

    def _run(self, sql: str, *args):
        """The first row of ``sql`` (None if none, or once the database has failed)."""
        if self.conn is None:
            return None
        try:
            return self.conn.execute(sql, args).fetchone()
        except sqlite3.Error as err:
            log.warning("request cache %s failed (%s); the rest of this task runs without it", self.path, err)
            self.close()
            return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def _checksum(key: str, text: str) -> str:
    return hashlib.sha256(f"{key}|{text}".encode()).hexdigest()[:16]


class RequestCache:
    """The cache folder of one namespace (``describe``): a ``TaskCache`` per task."""

    def __init__(self, root: str | Path, namespace: dict):
        self.namespace = namespace
        self.folder = Path(root) / CACHE_DIR / spec_key(namespace)

    def path_for(self, task: str) -> Path:
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', task) or '_'}.sqlite"

    @contextmanager
    def task(self, task: str):
        """The open ``TaskCache`` of ``task`` (None when it cannot be opened: warned). Logs how many
        batches it holds when it holds any, and on exit how many it served."""
        try:
            cache = TaskCache(self.path_for(task), self.namespace)
        except (sqlite3.Error, OSError) as err:
            log.warning("request cache %s cannot be used (%s); %s runs without it", self.path_for(task), err, task)
            yield None
            return
        if held := len(cache):
            log.info("%s: the request cache %s holds %d batches; those of this run are read back", task or "(no task)",
                     cache.path, held)
        try:
            yield cache
        finally:
            cache.close()
            if cache.hits:
                log.info("%s: %d of %d batches from the request cache %s", task or "(no task)", cache.hits,
                         cache.hits + cache.misses, cache.path)


@contextmanager
def task_cache(cache: RequestCache | None, task: str):
    """``cache.task(task)``, or None without a cache."""
    if cache is None:
        yield None
    else:
        with cache.task(task) as opened:
            yield opened


def for_run(spec, store_root: str | Path) -> RequestCache | None:
    """The request cache of a run (a ``RunSpec``) under ``store_root``; None when
    ``eval.request_cache`` is off."""
    if not spec.settings.request_cache:
        return None
    description = describe(spec.quantization_key(), spec.dtype, spec.device)
    if getattr(spec, "runtime", "fake") != "fake":  # real low-bit kernels compute other values than fake ones
        description["runtime"] = spec.runtime
    return RequestCache(store_root, description)
