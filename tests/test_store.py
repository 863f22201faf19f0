import json
import os
import stat
from datetime import datetime, timezone

import pytest

from qdlm_bench import store
from qdlm_bench.store import ResultStore, baseline_key, new_record, spec_key


def make_spec(**overrides):
    spec = {
        "model": {"name": "tiny-llada", "source": "zoo/tiny-llada"},
        "method": {"name": "rtn"},
        "quant": {"bits": "w4a16g128", "sym": False},
        "tasks": ["arith", "copy"],
        "eval": {"gen_length": 32, "steps": 32},
        "calib": {"dataset": "wikitext", "n_samples": 8},
        "dtype": "bfloat16",
        "seed": 0,
    }
    spec.update(overrides)
    return spec


def reversed_order(obj):
    """The same data with every dict's keys inserted in reverse order."""
    if isinstance(obj, dict):
        return {k: reversed_order(obj[k]) for k in reversed(list(obj))}
    return obj


def test_keys_are_stable_and_ignore_key_order():
    spec = make_spec()
    # Golden values: if these change, every stored result is orphaned.
    assert spec_key(spec) == "6c830f6b0caa5639"
    assert baseline_key(spec) == "870402ad89f2d3e1"
    assert spec_key(reversed_order(spec)) == spec_key(spec)
    assert baseline_key(reversed_order(spec)) == baseline_key(spec)


MUTATIONS = {
    "model": {"name": "tiny-dream", "source": "zoo/tiny-dream"},
    "method": {"name": "gptq"},
    "quant": {"bits": "w8a8", "sym": False},
    "tasks": ["arith"],
    "eval": {"gen_length": 64, "steps": 32},
    "calib": {"dataset": "wikitext", "n_samples": 16},
    "dtype": "float16",
    "seed": 1,
}


@pytest.mark.parametrize("field", MUTATIONS)
def test_keys_are_sensitive_to_their_fields_only(field):
    spec, changed = make_spec(), make_spec(**{field: MUTATIONS[field]})
    assert spec_key(changed) != spec_key(spec)
    same_baseline = field not in store.BASELINE_FIELDS  # method, quant (bits), calib
    assert (baseline_key(changed) == baseline_key(spec)) == same_baseline


def test_baseline_key_requires_its_fields():
    spec = make_spec()
    del spec["eval"]
    with pytest.raises(ValueError, match="eval"):
        baseline_key(spec)


def test_new_record_fields():
    spec = make_spec()
    record = new_record(spec, sweep="s1", metrics={"arith": {"metric": "acc", "value": 0.5}})
    assert (record["key"], record["baseline_key"]) == (spec_key(spec), baseline_key(spec))
    assert (record["model"], record["method"], record["bits"]) == ("tiny-llada", "rtn", "w4a16g128")
    assert (record["status"], record["error"], record["sweep"]) == ("done", None, "s1")
    assert (record["dtype"], record["seed"]) == ("bfloat16", 0)
    assert datetime.fromisoformat(record["created"]).utcoffset() == timezone.utc.utcoffset(None)
    assert set(record["versions"]) == {"qdlm_bench", "torch", "transformers", "lm_eval", "python", "git_sha"}
    assert record["versions"]["torch"] and record["versions"]["python"]
    json.dumps(record)  # serializable as is
    with pytest.raises(ValueError, match="derived"):
        new_record(spec, key="abc")
    with pytest.raises(ValueError, match="status"):
        new_record(spec, status="ok")


def test_write_get_is_done(tmp_path):
    results = ResultStore(tmp_path / "results")
    done = new_record(make_spec())
    failed = new_record(make_spec(seed=1), status="failed", error="boom")
    assert results.get(done["key"]) is None and not results.is_done(done["key"])
    path = results.write(done)
    results.write(failed)
    assert path == results.path_for(done["key"]) == tmp_path / "results" / f"{done['key']}.json"
    assert path.read_text().startswith('{\n  "key"')  # pretty-printed
    assert results.get(done["key"]) == done
    assert results.is_done(done["key"]) and not results.is_done(failed["key"])
    rerun = dict(failed, status="done", error=None)  # same spec: replacing is allowed
    results.write(rerun)
    assert results.is_done(failed["key"])


def test_write_rejects_wrong_key_and_collisions(tmp_path, monkeypatch):
    results = ResultStore(tmp_path)
    record = new_record(make_spec())
    with pytest.raises(ValueError, match="spec_key"):
        results.write(dict(record, key="0" * 16))
    # A file under this key that holds another spec is never replaced: as it is not a record of
    # that key, it is unreadable (replaced only on request, the pipeline's force=true) ...
    other = dict(record, spec=make_spec(seed=7))
    text = json.dumps(other)
    path = results.path_for(record["key"])
    path.write_text(text)
    with pytest.raises(store.CorruptRecordError, match="is not the hash of its spec"):
        results.write(record)
    assert path.read_text() == text
    # ... and a true collision (a readable record of another spec hashing to the same key) is an error
    real = store.spec_key
    monkeypatch.setattr(store, "spec_key", lambda spec: record["key"] if spec == other["spec"] else real(spec))
    with pytest.raises(ValueError, match="collision"):
        results.write(record)
    assert path.read_text() == text
    monkeypatch.undo()
    results.write(record, replace_corrupt=True)
    assert results.get(record["key"]) == record


def _dump_half_then_crash(obj, f, **kwargs):
    text = json.dumps(obj, **kwargs)
    f.write(text[: len(text) // 2])
    f.flush()
    raise KeyboardInterrupt("simulated crash mid-write")


def _replace_crash(src, dst):
    raise OSError("simulated crash before rename")


@pytest.mark.parametrize("target, crash", [("json.dump", _dump_half_then_crash),
                                           ("os.replace", _replace_crash)])
def test_atomic_write_survives_a_crash(tmp_path, monkeypatch, target, crash):
    results = ResultStore(tmp_path)
    first = new_record(make_spec(), status="failed", error="first attempt")
    path = results.write(first)
    before = path.read_text()
    module, name = target.split(".")
    monkeypatch.setattr(getattr(store, module), name, crash)
    with pytest.raises((KeyboardInterrupt, OSError), match="simulated"):
        results.write(dict(first, status="done", error=None))
    monkeypatch.undo()
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind
    assert results.get(first["key"])["error"] == "first attempt"


def test_records_filters_and_skips_corrupt_files(tmp_path):
    results = ResultStore(tmp_path)
    fp = new_record(make_spec(method={"name": "fp"}, quant={}), sweep="s1")
    w4 = new_record(make_spec(), sweep="s1")
    w8 = new_record(make_spec(quant={"bits": "w8a8"}), sweep="s2")
    for record in (fp, w4, w8):
        results.write(record)
    (tmp_path / "corrupt.json").write_text('{"key": "abc", "spec"')
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.warns(UserWarning) as caught:
        everything = results.records()
    assert {r["key"] for r in everything} == {fp["key"], w4["key"], w8["key"]}
    messages = " ".join(str(w.message) for w in caught)
    assert "corrupt.json" in messages and "list.json" in messages
    with pytest.warns(UserWarning):
        assert [r["key"] for r in results.records(method="rtn", sweep="s1")] == [w4["key"]]
        assert {r["key"] for r in results.records(bits=["w8a8", None])} == {fp["key"], w8["key"]}
        assert results.records(model="nope") == []
    assert ResultStore(tmp_path / "missing").records() == []


def test_records_are_group_readable(tmp_path):
    old = os.umask(0o022)
    try:
        path = ResultStore(tmp_path / "results").write(new_record(make_spec()))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    old = os.umask(0o077)  # a stricter umask is respected
    try:
        path = ResultStore(tmp_path / "private").write(new_record(make_spec()))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_check_writable(tmp_path):
    ResultStore(tmp_path / "new" / "results").check_writable()  # created
    assert (tmp_path / "new" / "results").is_dir() and not list((tmp_path / "new" / "results").iterdir())
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(store.StoreError, match=r"file.* is a file, not a folder; move the file away or pass store="):
        ResultStore(tmp_path / "file").check_writable()
    with pytest.raises(store.StoreError, match=r"cannot create the result store folder .*file/sub"):
        ResultStore(tmp_path / "file" / "sub").check_writable()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(store.StoreError, match=r"cannot write to the result store .*locked.*permissions"):
            ResultStore(locked).check_writable()


def test_get_raises_on_a_corrupt_record_and_records_skips_it(tmp_path):
    results = ResultStore(tmp_path)
    good = new_record(make_spec())
    results.write(good)
    truncated = new_record(make_spec(seed=1))
    results.path_for(truncated["key"]).write_text(json.dumps(truncated)[:50])
    not_record = new_record(make_spec(seed=2))
    results.path_for(not_record["key"]).write_text('{"hello": "world"}')
    for key, reason in ((truncated["key"], "invalid JSON"), (not_record["key"], "not a result record")):
        with pytest.raises(store.CorruptRecordError) as err:
            results.get(key)
        assert isinstance(err.value, ValueError) and err.value.path == results.path_for(key)
        assert str(results.path_for(key)) in str(err.value) and reason in str(err.value)
        assert "delete the file, or rerun with force=true" in str(err.value)
    copied = results.path_for("0" * 16)  # a good record under another key's name
    copied.write_text(results.path_for(good["key"]).read_text())
    with pytest.raises(store.CorruptRecordError, match=f"holds the record of key {good['key']}, not 0000"):
        results.get("0" * 16)
    copied.unlink()
    with pytest.warns(store.CorruptRecordWarning) as caught:
        assert [r["key"] for r in results.records()] == [good["key"]]
    assert len(caught) == 2
    assert set(results.skipped) == {results.path_for(truncated["key"]), results.path_for(not_record["key"])}
