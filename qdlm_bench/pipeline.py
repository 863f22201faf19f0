"""One run: validate → store check and lookup → load → calibrate → quantize → check → evaluate → record.

A quantized model is computed once: it is saved as an artifact (``qdlm_bench.artifacts``, by default
in the store's ``artifacts/``) and every later run, task job and analysis with the same quantization
(``RunSpec.quantization_key``) loads it instead of calibrating and quantizing (``quantized_model``);
the record says which artifact it used (``artifact: {key, path, loaded, saved}``).

Before any work the store must be writable and the run's record file, if any, readable (else
ConfigError: a record is never lost after the work, nor silently replaced unless ``force``). The
key's lock (``ResultStore.lock``) is held from the "is it done?" check through the record write:
two processes running the same configuration compute it once, the second waits and returns the
first's record without writing. After quantization the model is checked for numerical faults
(``faults.check_model``); a fault fails the run with ``fault: {kind, layer}`` in its record.
"""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from qdlm_bench import methods
from qdlm_bench import artifacts as artifacts_lib
from qdlm_bench import calibration, evaluation, faults, runspec, tracking
from qdlm_bench.artifacts import ArtifactError, ArtifactStore
from qdlm_bench.evaluation import request_cache
from qdlm_bench import gpu_pool
from qdlm_bench.models.factory import load_fp_model
from qdlm_bench.store import CorruptRecordError, ResultStore, StoreError, baseline_key, new_record, spec_key

log = logging.getLogger("qdlm_bench")


@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


def quantize(spec: runspec.RunSpec, model, tokenizer, timings: dict | None = None, check: bool = True) -> dict:
    """Build the run's calibration set (when its method needs one) and quantize ``model`` in
    place with its method; returns the method's info dict. ``timings`` gets calibrate_s/quantize_s
    (and check_s). With ``check``, the quantized model is checked for non-finite weights, activations
    and logits (``faults.check_model``, one probe forward): NumericalFault names the layer."""
    timings = {} if timings is None else timings
    calib = None
    if spec.calib:
        with timed(timings, "calibrate_s"):
            calib = calibration.build(spec.calib, tokenizer, model.config.mask_token_id,
                                      data_dir=spec.settings.data_dir)
    log.info("quantizing with %s at %s", spec.method["name"], spec.quant.name)
    with timed(timings, "quantize_s"):
        info = methods.get(spec.method["name"])(model, spec.quant, calib, spec.options)
    if check:
        with timed(timings, "check_s"):
            faults.check_model(model, calib)
    return info


def quantized_model(spec: runspec.RunSpec, timings: dict | None = None, artifacts: str | Path | None = None,
                    force: bool = False, used: dict | None = None):
    """``(model, tokenizer)``: the run's FP model quantized by its method (an FP run: the FP model).

    With ``artifacts`` (a folder; None: none is read or written) the quantized model is loaded from
    its artifact ``<artifacts>/<spec.quantization_key()>/`` when one is saved, complete and current
    (``timings["artifact_load_s"]``; no calibration, quantization or check); else it is quantized and
    checked (``quantize``), then saved there (``artifact_save_s``), under the key's lock: a process
    needing it meanwhile waits, then loads it. ``force`` quantizes again and replaces the artifact
    (unless another process did just that while this one waited). A numerical fault fails before
    anything is saved; a model the format cannot describe, a write error or any other failure to
    save costs only the artifact (a warning, and ``used["artifact"]["error"]``). ``used["artifact"]`` gets ``{key, path, loaded, saved}``."""
    timings = {} if timings is None else timings
    if spec.method["name"] == "fp" or artifacts is None:
        with timed(timings, "load_s"):
            model, tokenizer = load_fp_model(spec.model, spec.dtype, spec.device, spec.seed)
        if spec.method["name"] != "fp":
            quantize(spec, model, tokenizer, timings)
        return model, tokenizer
    store, key = ArtifactStore(artifacts), spec.quantization_key()
    info = {"key": key, "path": str(store.path_for(key)), "loaded": False, "saved": False}
    if used is not None:
        used["artifact"] = info
    for attempt in range(2):
        manifest = None if force else store.find(spec)
        if manifest is None:
            earlier = (store.manifest(key) or {}).get("id")
            with store.lock(key) as waited:
                found = store.find(spec, quiet=True)
                if found is not None and (not force or waited and found["id"] != earlier):
                    manifest = found  # saved by another process while this one waited
                else:
                    with timed(timings, "load_s"):
                        model, tokenizer = load_fp_model(spec.model, spec.dtype, spec.device, spec.seed)
                    method_info = quantize(spec, model, tokenizer, timings)
                    try:
                        with timed(timings, "artifact_save_s"):
                            saved = store.save(spec, model, method_info, timings.get("quantize_s"))
                        info["saved"] = True
                        log.info("saved artifact %s (%s, %.1f MB)", info["path"], saved["format"],
                                 saved["sizes"]["artifact_bytes"] / 1e6)
                    except Exception as err:  # the artifact is a saving, the quantized model is the run's
                        info["error"] = f"{type(err).__name__}: {err}"
                        log.warning("artifact %s not saved: %s", key, info["error"])
                    return model, tokenizer
        try:
            with timed(timings, "artifact_load_s"):
                model, tokenizer, _ = store.load(spec, manifest=manifest)
        except (ArtifactError, OSError, ValueError, KeyError) as err:  # its files changed under it
            if attempt:
                raise
            log.warning("artifact %s could not be loaded (%s: %s); quantizing again", key, type(err).__name__, err)
            force = True
            continue
        info["loaded"] = True
        log.info("loaded the quantized model from artifact %s", info["path"])
        return model, tokenizer
    raise AssertionError("unreachable")


def execute(spec: runspec.RunSpec, timings: dict, store_root: str = "results", artifacts: str | Path | None = None,
            force: bool = False, used: dict | None = None) -> dict:
    """Load and quantize (or load the run's artifact: ``quantized_model``), then evaluate; returns the
    per-task metrics. Finished evaluation batches persist under ``store_root``
    (``evaluation.request_cache``) unless ``eval.request_cache`` is off."""
    model, tokenizer = quantized_model(spec, timings, artifacts, force, used)
    import torch

    model, info = with_runtime(spec, model, timings)
    if used is not None:
        used["runtime"] = info
    log.info("evaluating %s", ", ".join(spec.tasks))
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with timed(timings, "evaluate_s"):
        metrics = evaluation.run(model, tokenizer, spec.tasks, spec.settings, request_cache.for_run(spec, store_root))
    info["eval_peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
    return metrics


def with_runtime(spec: runspec.RunSpec, model, timings: dict):
    """``(model, info)``: with ``runtime=real``, the model's quantized linears replaced by real low-bit
    modules (``runtime.real.convert``; ``timings["runtime_convert_s"]``); the record's ``runtime``
    ``info``: runtime, format, kernel, why a setting runs fake, weight bytes vs bf16 and a forward's
    latency (``runtime.real.linear_bytes``, ``forward_latency``), for fake runs too. A fake run folds
    the online transforms of inputs it does not quantize into the weights
    (``quant.fold_input_transforms``; ``transforms_folded``)."""
    from qdlm_bench.runtime import real

    info = {"runtime": spec.runtime, "format": None, "kernel": None, "fake_reason": None}
    if spec.runtime == "real":
        info.update(real.plan(spec.quant, spec.device, spec.dtype))
        if info["format"]:
            with timed(timings, "runtime_convert_s"):
                info.update(real.convert(model, info["format"]))
            log.info("runtime=real: %d linears on %s (%d kept fake)", info["layers_real"], info["kernel"],
                     info["layers_fake"])
        else:
            log.info("runtime=real: %s runs fake: %s", spec.quant.name, info["fake_reason"])
    if not info["format"]:  # fake: online transforms of unquantized inputs folded into the weights
        from qdlm_bench import quant

        info["transforms_folded"] = quant.fold_input_transforms(model)
        if info["transforms_folded"]:
            log.info("folded %d online input transforms into their weights (inputs not quantized)",
                     info["transforms_folded"])
    info.update(real.linear_bytes(model))
    info.update(real.forward_latency(model))
    return model, info


def run(cfg: dict, store_root: str = "results", force: bool = False, sweep: str | None = None,
        wandb_cfg: dict | None = None, spec: runspec.RunSpec | None = None) -> dict:
    """Run one configuration (a resolved Hydra config as a dict; ``spec``: its RunSpec when the
    caller has built it) and return its record.

    Invalid configs, an unusable store and an unreadable record of this run (unless ``force``:
    then it is replaced) raise ConfigError before any work. A finished run is skipped unless
    ``force``; a run that another process is running is waited for and its record returned (even
    with ``force``: it has just been run); a run that fails is recorded with status "failed", its
    traceback and, for a numerical fault, ``fault``. wandb logs the record as written.
    """
    spec = spec or runspec.build(cfg)
    try:
        wandb_logger = tracking.WandbLogger(**(wandb_cfg or {}))
    except (TypeError, ValueError) as err:
        raise runspec.ConfigError(f"bad wandb settings: {err}") from None
    semantic = spec.semantic()
    store = ResultStore(store_root)
    try:
        store.check_writable()
    except StoreError as err:
        raise runspec.ConfigError(str(err)) from None
    key = spec_key(semantic)
    label = f"{spec.model['name']} {spec.method['name']} {spec.quant.name}"
    before = _lookup(store, key, force)
    if before is not None and before.get("status") == "done" and not force:
        log.info("skipping %s: already in %s", label, store.path_for(key))
        return before
    with store.lock(key) as waited:
        now = _lookup(store, key, force, quiet=True)
        if now is not None and (now.get("status") == "done" and not force
                                or waited and now.get("created") != (before or {}).get("created")):
            log.info("skipping %s: %s by another process while waiting (%s)", label, now.get("status"),
                     store.path_for(key))
            return now
        record = _execute_and_record(spec, semantic, store, sweep, artifacts_lib.root_of(cfg, store_root), force)
    try:
        wandb_logger.log_record(record)
    except Exception as err:  # the record is the result; wandb is a copy of it
        log.error("wandb logging of %s failed (%s: %s); the record is in %s", key, type(err).__name__, err,
                  store.path_for(key))
    return record


def _lookup(store: ResultStore, key: str, force: bool, quiet: bool = False) -> dict | None:
    """The stored record of ``key`` (None if none); an unreadable one is a ConfigError unless ``force``."""
    try:
        return store.get(key)
    except CorruptRecordError as err:
        if not force:
            raise runspec.ConfigError(str(err)) from None
        if not quiet:
            log.warning("replacing %s (force=true): %s", err.path, err.reason)
        return None


def _execute_and_record(spec: runspec.RunSpec, semantic: dict, store: ResultStore, sweep: str | None,
                        artifacts: Path | None = None, force: bool = False) -> dict:
    """Execute the run and write its record; returns the record as read back from its file."""
    timings: dict = {}
    used: dict = {}  # the artifact the run loaded or saved (quantized_model)
    fields = dict(sweep=sweep, device=spec.device, dtype=spec.dtype, seed=spec.seed)
    fields["host"] = gpu_pool.host()  # where it ran: hostname, pid, visible GPUs, leased GPU, SLURM ids
    with timed(timings, "total_s"):
        try:
            metrics = execute(spec, timings, store.root, artifacts, force, used)
            status, error, fault = "done", None, None
        except Exception as exc:  # recorded, so that a sweep goes on
            metrics, status, error = {}, "failed", traceback.format_exc()
            found = faults.find(exc)
            fault = found.as_dict() if found is not None else None
            log.error("run failed: %s", str(found) if found is not None else error.strip().splitlines()[-1])
    fields["artifact"] = used.get("artifact")  # {key, path, loaded, saved}; None for FP runs
    fields["runtime"] = used.get("runtime")  # runtime, format, kernel, weight bytes, latency (with_runtime)
    record = new_record(semantic, status=status, error=error, fault=fault, metrics=metrics, timings=timings,
                        **fields)
    path = store.write(record, replace_corrupt=True)  # an unreadable file here was accepted by _lookup
    log.info("wrote %s (%s)", path, status)
    return store.load(path)


def baseline_config(cfg: dict) -> dict:
    """The FP run of ``cfg``'s model, tasks and eval settings (the same baseline key)."""
    return {**cfg, "method": {"name": "fp"}, "quant": {**cfg["quant"], "exclude": [], "lm_head": False}}


def ensure_baseline(cfg: dict, store_root: str = "results", sweep: str | None = None,
                    wandb_cfg: dict | None = None) -> dict | None:
    """The finished FP record sharing ``cfg``'s baseline key: found in the store, else run now
    (``run`` on ``baseline_config``). None for an FP ``cfg`` itself."""
    if cfg["method"]["name"] == "fp":
        return None
    fp_cfg = baseline_config(cfg)
    store = ResultStore(store_root)
    found = store.records(baseline_key=baseline_key(runspec.build(fp_cfg).semantic()), method="fp", status="done")
    if found:
        return found[-1]
    log.info("running the FP baseline of %s first (baseline=auto)", cfg["model"]["name"])
    return run(fp_cfg, store_root=store_root, sweep=sweep, wandb_cfg=wandb_cfg)
