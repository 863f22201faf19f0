"""Resume inside a task (``evaluation.request_cache``): a run SIGKILLed in the middle of a task
recomputes only the batches it had not finished, and its metrics equal an uninterrupted run's."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from qdlm_bench import diffusion, pipeline, runspec
from qdlm_bench.evaluation import adapter, request_cache
from qdlm_bench.evaluation.request_cache import RequestCache, TaskCache
from qdlm_bench.generation import GenerationConfig
from qdlm_bench.models import DiffusionLM
from qdlm_bench.store import ResultStore, spec_key

from test_diffusion import tiny
from test_is_greedy import SETTINGS as GREEDY_SETTINGS, TOK, LettersOnly, request as greedy_request
from test_pipeline import ROOT, config

NAMESPACE = {"quantization_key": "0" * 16, "dtype": "float32", "device": "cpu"}
# a likelihood task, then a generation task that samples (temperature > 0: the generator's stream
# runs across batches); batch_size 1 makes 8 generation batches of 32 forward passes each
OVERRIDES = ["method=fp", "model=tiny_random_llada", "tasks=[mini_qa,mini_math]", "eval.limit=8",
             "eval.mc_num=4", "eval.batch_size=1", "eval.log_samples=true", "device=cpu", "dtype=float32",
             "+eval.generation={mini_math:{temperature:0.5,gen_length:32,steps:32,block_length:16}}"]


class ForwardCounter:
    """Counts forward passes of every DiffusionLM (a global module hook) while active."""

    def __init__(self):
        self.n = 0

    def __enter__(self):
        def hook(module, args, output):
            self.n += type(module) is DiffusionLM

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def results(record: dict) -> dict:
    """The results of a record's tasks: metrics with stderr, all of lm-eval's, and the samples."""
    out = {task: {k: m[k] for k in ("metric", "value", "stderr", "all", "samples")} for task, m in record["metrics"].items()}
    assert all(m["samples"] and m["all"] for m in out.values())
    return out


def stored_keys(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {k for (k,) in conn.execute("SELECT key FROM batches")}


# ------------------------------------------------------------------------------ the sampler hook


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cached_batches_are_not_computed_and_change_no_number(tmp_path, family):
    model = tiny(family)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13], [14, 15]]
    cfg = GenerationConfig(gen_length=8, steps=8, block_length=4, temperature=0.7, alg_temp=0.5)
    pairs = [([1, 2], [3, 4, 5]), ([6], [7, 8]), ([9, 10, 11], [12]), ([], [13, 14, 15, 16])]

    def evaluate(cache):
        g = torch.Generator().manual_seed(3)
        with ForwardCounter() as calls:
            out = (diffusion.generate(model, prompts, cfg, batch_size=2, generator=g, cache=cache),
                   diffusion.loglikelihood(model, pairs, mc_num=3, batch_size=4, seed=1, cache=cache))
        return out, calls.n, g.get_state()

    plain, n_plain, state = evaluate(None)
    path = tmp_path / "t.sqlite"
    cache = TaskCache(path, NAMESPACE)
    assert evaluate(cache)[:2] == (plain, n_plain) and len(cache) == 3 + 3  # 3 generation + 3 likelihood batches
    assert cache.hits == 0 and cache.misses == 6
    cache.close()
    # drop the first generation batch and the last likelihood batch: only they are computed again,
    # and the generator (restored after each cached batch) ends where an uninterrupted run's does
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT key, value FROM batches ORDER BY rowid").fetchall()
        gen = [k for k, v in rows if v.startswith('{"tokens"')]
        elbo = [k for k, v in rows if not v.startswith('{"tokens"')]
        conn.execute("DELETE FROM batches WHERE key IN (?, ?)", (gen[0], elbo[-1]))
    with ForwardCounter() as first_batch:  # the two shortest prompts, from the same generator state
        diffusion.generate(model, [[9], [14, 15]], cfg, batch_size=2, generator=torch.Generator().manual_seed(3))
    cache = TaskCache(path, NAMESPACE)
    out, n, end_state = evaluate(cache)
    assert out == plain and torch.equal(end_state, state)
    assert (cache.hits, cache.misses) == (4, 2) and n == first_batch.n + 1  # + one likelihood forward
    cache.close()


def test_the_adapter_serves_is_greedy_and_rolling_likelihoods_from_the_cache(tmp_path):
    model = LettersOnly("llada")
    pairs = [greedy_request("lambada_openai", c, doc_id=i) for i, c in enumerate(["abc", "xyz"])]
    rolling = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0,
                        metadata=("wikitext", i, 1)) for i, text in enumerate(["hello world", "a longer text"])]

    def evaluate(cache):
        lm = adapter.DiffusionLMAdapter(model, TOK, GREEDY_SETTINGS, cache)
        model.calls = 0
        out = lm.loglikelihood(pairs), lm.loglikelihood_rolling(rolling)
        return out, model.calls

    plain, n = evaluate(None)
    cache = RequestCache(tmp_path, NAMESPACE)
    assert evaluate(cache) == (plain, n) and n > 2  # likelihood, decoding and rolling passes
    assert evaluate(cache) == (plain, 0)  # all of them read back
    assert {p.name for p in cache.folder.iterdir()} == {"lambada_openai.sqlite", "wikitext.sqlite"}


def test_generation_with_a_cache_needs_a_generator(tmp_path):
    cache = TaskCache(tmp_path / "t.sqlite", NAMESPACE)
    with pytest.raises(ValueError, match="explicit generator"):
        diffusion.generate(tiny("llada"), [[1]], GenerationConfig(gen_length=4, steps=4, block_length=4), cache=cache)
    cache.close()


# --------------------------------------------------------------------------- unusable databases


def filled(path: Path, namespace=NAMESPACE) -> str:
    cache = TaskCache(path, namespace)
    key = cache.key("elbo", ([torch.tensor([1, 2])], [0.5]))
    cache.put(key, [1.25, -3.0])
    assert cache.get(key) == [1.25, -3.0]
    cache.close()
    return key


def test_a_truncated_database_is_moved_aside_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "t.sqlite"
    key = filled(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        cache = TaskCache(path, NAMESPACE)
    assert cache.get(key) is None and len(cache) == 0  # recomputed, never read from a broken file
    aside = list(tmp_path.glob("t.sqlite.broken-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == data[: len(data) // 2]
    assert "is unusable" in caplog.text and str(aside[0]) in caplog.text
    cache.put(key, [2.0])
    cache.close()
    assert TaskCache(path, NAMESPACE).get(key) == [2.0]


def test_a_file_that_is_not_sqlite_is_moved_aside(tmp_path, caplog):
    path = tmp_path / "t.sqlite"
    path.write_text("not a database" * 100)
    with caplog.at_level(logging.WARNING):
        assert len(TaskCache(path, NAMESPACE)) == 0
    assert "is unusable" in caplog.text and (tmp_path / "t.sqlite").exists()
    assert [p.read_text() for p in tmp_path.glob("t.sqlite.broken-*")] == ["not a database" * 100]


def test_a_row_that_fails_its_checksum_is_recomputed(tmp_path, caplog):
    path = tmp_path / "t.sqlite"
    key = filled(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE batches SET value = '[1.25, -3.5]'")
    cache = TaskCache(path, NAMESPACE)
    with caplog.at_level(logging.WARNING):
        assert cache.get(key) is None
    assert "fails its checksum" in caplog.text


def test_a_cache_of_another_model_or_dtype_never_serves(tmp_path, caplog):
    fp = runspec.build(config(*OVERRIDES))
    others = [runspec.build(config(*OVERRIDES, *extra)) for extra in
              (["method=rtn", "bits=w8a16"], ["dtype=bfloat16"], ["seed=1"])]
    root = tmp_path / "store"
    folders = {request_cache.for_run(s, root).folder for s in [fp, *others]}
    assert len(folders) == 4  # one namespace each
    # a database copied into another namespace's folder is refused (moved aside), not read
    a, b = (request_cache.for_run(s, root) for s in (fp, others[1]))
    key = filled(a.path_for("mini_qa"), a.namespace)
    b.folder.mkdir(parents=True)
    b.path_for("mini_qa").write_bytes(a.path_for("mini_qa").read_bytes())
    with caplog.at_level(logging.WARNING), b.task("mini_qa") as cache:
        assert cache.get(key) is None and len(cache) == 0
    assert "belongs to namespace" in caplog.text


def test_a_locked_database_is_not_moved_aside_and_the_task_runs_without_it(tmp_path, monkeypatch, caplog):
    cache = RequestCache(tmp_path, NAMESPACE)
    key = filled(cache.path_for("t"), NAMESPACE)
    monkeypatch.setattr(request_cache, "BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(cache.path_for("t"), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another job, writing for longer than the busy timeout
    with caplog.at_level(logging.WARNING), cache.task("t") as opened:
        assert opened is None
    assert "cannot be used (database is locked); t runs without it" in caplog.text
    holder.execute("ROLLBACK")
    holder.close()
    assert not list(tmp_path.rglob("*.broken-*"))
    with cache.task("t") as opened:
        assert opened.get(key) == [1.25, -3.0]


def _fill(path: str, offset: int) -> None:
    cache = TaskCache(Path(path), NAMESPACE)
    for i in range(offset, offset + 150):
        cache.put(cache.key("elbo", ([torch.tensor([i])],)), [float(i) / 7])
    cache.close()


def test_two_processes_write_one_database_at_once(tmp_path):
    path = tmp_path / "t.sqlite"
    TaskCache(path, NAMESPACE).close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_fill, args=(str(path), offset)) for offset in (0, 100)]  # 50 keys in common
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = TaskCache(path, NAMESPACE)
    assert len(cache) == 250
    assert all(cache.get(cache.key("elbo", ([torch.tensor([i])],))) == [i / 7] for i in range(250))


def test_a_request_cache_setting_that_is_not_a_boolean_is_refused():
    with pytest.raises(runspec.ConfigError, match=r"eval.request_cache must be true or false, got 'maybe'"):
        runspec.build(config(*OVERRIDES, "eval.request_cache=maybe"))


def test_the_request_cache_setting_is_not_in_the_record_key():
    on, off = (runspec.build(config(*OVERRIDES, f"eval.request_cache={v}")) for v in ("true", "false"))
    assert spec_key(on.semantic()) == spec_key(off.semantic())
    assert request_cache.for_run(off, "results") is None
    cfg = config(*OVERRIDES)
    del cfg["eval"]["request_cache"]  # a configuration from before the setting existed: the same key
    assert spec_key(runspec.build(cfg).semantic()) == spec_key(on.semantic())


# ------------------------------------------------------------------------- SIGKILL inside a task


def test_a_run_killed_inside_a_task_resumes_without_recomputing_finished_batches(tmp_path, monkeypatch, caplog):
    cfg = config(*OVERRIDES)
    # the uninterrupted reference, in a store of its own; the forward passes of each batch are noted
    per_batch, mark = {}, {}
    counter = ForwardCounter()
    real_get, real_put = TaskCache.get, TaskCache.put
    monkeypatch.setattr(TaskCache, "get", lambda self, k: mark.update(n=counter.n) or real_get(self, k))
    monkeypatch.setattr(TaskCache, "put", lambda self, k, v: per_batch.update({k: counter.n - mark["n"]})
                        or real_put(self, k, v))
    with counter:
        reference = pipeline.run(cfg, store_root=tmp_path / "reference")
    monkeypatch.undo()
    assert reference["status"] == "done", reference["error"]
    n_reference = counter.n
    caches = {p.stem: p for p in (tmp_path / "reference" / "request_cache").glob("*/*.sqlite")}
    assert set(caches) == {"mini_qa", "mini_math"}
    total = len(stored_keys(caches["mini_math"]))
    assert total == 8 and set(per_batch) == stored_keys(caches["mini_qa"]) | stored_keys(caches["mini_math"])

    # the same run as a subprocess, SIGKILLed once it has stored some but not all generation batches
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # as this process (conftest)
    log_file = tmp_path / "run.log"  # a file, not a pipe: a full pipe would stall the run
    with log_file.open("w") as out:
        proc = subprocess.Popen([sys.executable, "run.py", *OVERRIDES, f"store={store}",
                                 f"hydra.run.dir={tmp_path / 'out'}"], cwd=ROOT, env=env, stdout=out, stderr=out)
    deadline = time.monotonic() + 120
    db = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list(store.glob("request_cache/*/mini_math.sqlite"))
        try:
            if found and len(stored_keys(found[0])) >= total // 2:
                db = found[0]
                break
        except sqlite3.OperationalError:  # its tables are not created yet
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # os.kill(pid, SIGKILL), unless the run has ended (and been reaped)
    proc.wait(timeout=30)
    assert db is not None, f"no kill: the run ended before half the generation batches were stored: " \
                           f"{log_file.read_text()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert list(store.glob("*.json")) == []  # died before its record: mid-run
    cached = stored_keys(db) | stored_keys(db.with_name("mini_qa.sqlite"))
    done = len(stored_keys(db))
    assert total // 2 <= done < total, f"killed after {done} of {total} batches"
    assert cached <= set(per_batch)  # the killed run computed the reference's batches

    # resumed in this process: only the batches it had not finished run the model
    with caplog.at_level(logging.INFO, logger="qdlm_bench"), ForwardCounter() as resumed_calls:
        resumed = pipeline.run(cfg, store_root=store)
    assert resumed["status"] == "done", resumed["error"]
    saved = sum(per_batch[k] for k in cached)
    assert resumed_calls.n == n_reference - saved
    assert f"mini_math: the request cache {db} holds {done} batches" in caplog.text
    assert f"mini_math: {done} of {total} batches from the request cache {db}" in caplog.text
    # every metric and every sample's responses (log_samples), bit for bit; measurements (timings) aside
    assert results(resumed) == results(reference) == results(ResultStore(store).records()[0])
    print(f"\nresume: mini_math killed after {done} of {total} batches; {len(cached)} batches cached in all; "
          f"forward calls {n_reference} uninterrupted, {resumed_calls.n} resumed ({saved} saved); evaluation "
          f"{reference['timings']['evaluate_s']} s uninterrupted, {resumed['timings']['evaluate_s']} s resumed")


def test_a_resumed_generation_counts_only_the_samples_it_generates(tmp_path):
    from qdlm_bench.decoders.counting import GenerationMeter

    model, cfg = tiny("llada"), GenerationConfig(gen_length=8, steps=8, block_length=4)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13], [14, 15]]  # batches of 2, 2, 1

    def measured(cache):
        meter = GenerationMeter(model)
        with meter.measure(len(prompts)):
            diffusion.generate(model, prompts, cfg, batch_size=2, generator=torch.Generator().manual_seed(0),
                               cache=cache, on_read_back=meter.read_back)
        return meter.stats()

    cache = TaskCache(tmp_path / "t.sqlite", NAMESPACE)
    first = measured(cache)
    assert (first["samples"], first["read_back"], first["forward_passes_per_sample"]) == (5, 0, 8)
    with sqlite3.connect(cache.path) as conn:  # the last batch (the longest prompt) is lost
        conn.execute("DELETE FROM batches WHERE rowid = (SELECT max(rowid) FROM batches)")
    resumed = measured(cache)
    assert (resumed["samples"], resumed["read_back"], resumed["forward_passes_per_sample"]) == (1, 4, 8)
    cache.close()
