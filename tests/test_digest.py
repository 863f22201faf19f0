"""The checkpoint fingerprint identifies the weights by their full content."""

import hashlib
import json
import shutil

import pytest

from qdlm_bench import digest
from qdlm_bench.paths import ZOO_DIR

MODEL = ZOO_DIR / "tiny-llada-instruct"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    digest._MEMORY.clear()


def test_fingerprint_sees_one_mib_overwritten_in_the_middle(tmp_path):
    """The corruption the old fingerprint (config.json, sizes, first and last MiB) missed: a copy
    with 1 MiB of zeros in the middle of the weights."""
    copy = shutil.copytree(MODEL, tmp_path / "copy")
    weights = copy / "model.safetensors"
    size = weights.stat().st_size
    assert size > 3 * 2**20
    intact = digest.checkpoint_fingerprint(copy)
    assert intact == digest.checkpoint_fingerprint(MODEL)  # by content, not location
    with weights.open("r+b") as f:
        f.seek(size // 2)
        f.write(bytes(2**20))
    assert weights.stat().st_size == size
    assert digest.checkpoint_fingerprint(copy) != intact


def test_fingerprint_covers_config_and_tokenizer(tmp_path):
    copy = shutil.copytree(MODEL, tmp_path / "copy")
    intact = digest.checkpoint_fingerprint(copy)
    tok = copy / "tokenizer_config.json"
    tok.write_text(tok.read_text() + " ")
    assert digest.checkpoint_fingerprint(copy) != intact


def test_file_digest_is_sha256_and_cached_on_disk(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * (3 * 2**12)  # 3 MiB
    path.write_bytes(data)
    assert digest.file_digest(path) == hashlib.sha256(data).hexdigest()
    stored = json.loads(digest.cache_file().read_text())
    assert list(stored.values()) == [hashlib.sha256(data).hexdigest()]
    # a later process reads the disk cache (proved by planting a value under the same stat key)
    stored[next(iter(stored))] = "planted"
    digest.cache_file().write_text(json.dumps(stored))
    digest._MEMORY.clear()
    assert digest.file_digest(path) == "planted"
    # a rewrite (new mtime or inode) misses the cache
    path.unlink()
    path.write_bytes(data[::-1])
    digest._MEMORY.clear()
    assert digest.file_digest(path) == hashlib.sha256(data[::-1]).hexdigest()


def test_sources_digest_sees_a_changed_byte_and_a_renamed_file_but_not_the_order(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    base = digest.sources_digest([("a.py", a), ("b.py", b)])
    assert digest.sources_digest([("b.py", b), ("a.py", a)]) == base
    assert digest.sources_digest([("a.py", a), ("c.py", b)]) != base
    a.write_text("x = 2\n")
    assert digest.sources_digest([("a.py", a), ("b.py", b)]) != base


def test_artifacts_and_request_cache_hash_their_code_with_one_primitive(monkeypatch):
    from qdlm_bench import artifacts
    from qdlm_bench.evaluation import request_cache

    seen = []
    monkeypatch.setattr(artifacts, "sources_digest", lambda files: seen.append("artifacts") or "f" * 64)
    monkeypatch.setattr(request_cache, "sources_digest", lambda files: seen.append("cache") or "e" * 64)
    artifacts.code_fingerprint.cache_clear()  # computed once per process: drop the real value, and ours after
    try:
        assert artifacts.code_fingerprint() == "f" * 16 and request_cache.code_digest() == "e" * 64
    finally:
        artifacts.code_fingerprint.cache_clear()
    assert seen == ["artifacts", "cache"]
