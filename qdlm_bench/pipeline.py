"""One run: validate → store check and lookup → load → calibrate → quantize → check → evaluate → record.

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

from qdlm_bench import methods
from qdlm_bench import calibration, evaluation, faults, runspec, tracking
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


def execute(spec: runspec.RunSpec, timings: dict, store_root: str = "results") -> dict:
    """Load, quantize and evaluate; returns the per-task metrics. Finished evaluation batches persist
    under ``store_root`` (``evaluation.request_cache``) unless ``eval.request_cache`` is off."""
    with timed(timings, "load_s"):
        model, tokenizer = load_fp_model(spec.model, spec.dtype, spec.device, spec.seed)
    quantize(spec, model, tokenizer, timings)
    log.info("evaluating %s", ", ".join(spec.tasks))
    with timed(timings, "evaluate_s"):
        return evaluation.run(model, tokenizer, spec.tasks, spec.settings, request_cache.for_run(spec, store_root))


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
        record = _execute_and_record(spec, semantic, store, sweep)
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


def _execute_and_record(spec: runspec.RunSpec, semantic: dict, store: ResultStore, sweep: str | None) -> dict:
    """Execute the run and write its record; returns the record as read back from its file."""
    timings: dict = {}
    fields = dict(sweep=sweep, device=spec.device, dtype=spec.dtype, seed=spec.seed)
    fields["host"] = gpu_pool.host()  # where it ran: hostname, pid, visible GPUs, leased GPU, SLURM ids
    with timed(timings, "total_s"):
        try:
            metrics = execute(spec, timings, store.root)
            status, error, fault = "done", None, None
        except Exception as exc:  # recorded, so that a sweep goes on
            metrics, status, error = {}, "failed", traceback.format_exc()
            found = faults.find(exc)
            fault = found.as_dict() if found is not None else None
            log.error("run failed: %s", str(found) if found is not None else error.strip().splitlines()[-1])
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
