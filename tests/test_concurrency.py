"""The store under concurrency (issue 17, item 5): a per-key lock makes two processes that want
the same configuration compute it once; the second waits, then takes the first's record without
writing. Two identical sweeps started at once keep separate Hydra folders and leave one whole
record per configuration."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_pipeline import FAST, config

from qdlm_bench import pipeline
from qdlm_bench.store import LOCK_DIR, ResultStore, new_record

SPEC = {"model": {"name": "m"}, "method": {"name": "rtn"}, "quant": {"bits": "w4a16"}, "tasks": ["t"],
        "eval": {}, "dtype": "float32", "seed": 0}
CTX = multiprocessing.get_context("fork")


def hold_then_write(root, key, ready, release):
    """Take ``key``'s lock, say so, wait for ``release``, write a record, let go."""
    store = ResultStore(root)
    with store.lock(key):
        ready.set()
        release.wait(60)
        store.write(new_record(SPEC, error="written by the holder"))


def test_a_second_writer_waits_for_the_lock_and_then_sees_the_record(tmp_path, caplog):
    store = ResultStore(tmp_path)
    key = new_record(SPEC)["key"]
    ready, release = CTX.Event(), CTX.Event()
    holder = CTX.Process(target=hold_then_write, args=(tmp_path, key, ready, release))
    holder.start()
    assert ready.wait(60)
    threading.Timer(1.0, release.set).start()
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="qdlm_bench"), store.lock(key) as waited:
        assert waited and time.monotonic() - start >= 0.9
        assert store.get(key)["error"] == "written by the holder"  # written before the lock was ours
    holder.join(60)
    assert holder.exitcode == 0
    assert f"waiting for {key} (another process is running it)" in caplog.text
    with store.lock(key) as waited:  # free again: no wait
        assert not waited
    lock = tmp_path / LOCK_DIR / f"{key}.lock"
    assert lock.stat().st_mode & 0o044 == 0o044  # group- and world-readable (umask 022)


def hold_forever(root, key, ready):
    with ResultStore(root).lock(key):
        ready.set()
        time.sleep(600)


def test_a_dead_holder_releases_the_lock(tmp_path):
    ready = CTX.Event()
    holder = CTX.Process(target=hold_forever, args=(tmp_path, "k", ready))
    holder.start()
    assert ready.wait(60)
    os.kill(holder.pid, signal.SIGKILL)  # dies without cleaning up
    holder.join(60)
    with ResultStore(tmp_path).lock("k") as waited:  # the kernel dropped its flock
        assert not waited


def run_in_child(cfg, root, queue):
    def no_work(*args):
        raise AssertionError("executed although another process had run it")

    pipeline.execute = no_work
    queue.put(pipeline.run(cfg, store_root=root))


def hold_then_write_record(root, record, ready, release):
    store = ResultStore(root)
    with store.lock(record["key"]):
        ready.set()
        release.wait(60)
        store.write(record)


def test_pipeline_run_waits_for_a_run_in_progress_and_returns_its_record_without_writing(tmp_path):
    """A holder process plays the other run: the child's pipeline.run waits on the key's lock,
    then returns the holder's record without executing or writing. (Processes are forked before
    any lock is taken here: a forked child shares its parent's flock.)"""
    cfg = config("method=rtn", "bits=w8a16")
    semantic = pipeline.runspec.build(cfg).semantic()
    store = ResultStore(tmp_path)
    record = new_record(semantic, metrics={"mini_qa": {"metric": "acc,none", "value": 0.5}})
    ready, release, queue = CTX.Event(), CTX.Event(), CTX.Queue()
    holder = CTX.Process(target=hold_then_write_record, args=(tmp_path, record, ready, release))
    holder.start()
    assert ready.wait(60)
    child = CTX.Process(target=run_in_child, args=(cfg, tmp_path, queue))
    child.start()
    time.sleep(2.0)  # the child is now waiting on the lock
    assert child.is_alive() and queue.empty() and not store.path_for(record["key"]).exists()
    release.set()
    got = queue.get(timeout=120)
    child.join(60)
    holder.join(60)
    assert (child.exitcode, holder.exitcode) == (0, 0)
    assert got == store.get(record["key"]) and got["created"] == record["created"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_two_identical_sweeps_at_once_compute_each_configuration_once(tmp_path):
    store = tmp_path / "results"
    cmd = [sys.executable, "-m", "qdlm_bench.cli", "-m", "method=fp,rtn", "bits=w4a16", *FAST, f"store={store}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    both = "\n".join(outs)
    records = ResultStore(store).records()
    assert sorted((r["method"], r["bits"]) for r in records) == [("fp", "fp"), ("rtn", "w4a16")]
    assert all(r["status"] == "done" for r in records)
    # each configuration computed (evaluated, written) exactly once across both sweeps
    assert len(re.findall(r"\] - evaluating mini_qa", both)) == 2, both[-4000:]
    wrote = re.findall(r"\] - wrote (\S+) \(done\)", both)
    assert sorted(Path(w).stem for w in wrote) == sorted(r["key"] for r in records)
    # the other sweep's two jobs found them done (after waiting, or already)
    assert len(re.findall(r"\] - skipping ", both)) == 2
    assert sorted(p.name for p in store.glob("*.json")) == sorted(f"{r['key']}.json" for r in records)
    assert not list(store.glob(".*.tmp"))  # no half-written record left
    folders = sorted((tmp_path / "multirun").iterdir())
    assert len(folders) == 2 and {f.name.rsplit("_", 1)[1] for f in folders} == {str(p.pid) for p in procs}
    print(both[-6000:])  # for the record: who ran, who waited
