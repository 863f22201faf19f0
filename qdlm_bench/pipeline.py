"""One run: validate → store lookup → load → calibrate → quantize → evaluate → record."""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import contextmanager

from qdlm_bench import methods
from qdlm_bench import calibration, evaluation, runspec, tracking
from qdlm_bench.models.factory import load_fp_model
from qdlm_bench.store import ResultStore, baseline_key, new_record, spec_key

log = logging.getLogger("qdlm_bench")


@contextmanager
def timed(timings: dict, name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - start, 3)


def quantize(spec: runspec.RunSpec, model, tokenizer, timings: dict | None = None) -> dict:
    """Build the run's calibration set (when its method needs one) and quantize ``model`` in
    place with its method; returns the method's info dict. ``timings`` gets calibrate_s/quantize_s."""
    timings = {} if timings is None else timings
    calib = None
    if spec.calib:
        with timed(timings, "calibrate_s"):
            calib = calibration.build(spec.calib, tokenizer, model.config.mask_token_id,
                                      data_dir=spec.settings.data_dir)
    log.info("quantizing with %s at %s", spec.method["name"], spec.quant.name)
    with timed(timings, "quantize_s"):
        return methods.get(spec.method["name"])(model, spec.quant, calib, spec.options)


def execute(spec: runspec.RunSpec, timings: dict) -> dict:
    """Load, quantize and evaluate; returns the per-task metrics."""
    with timed(timings, "load_s"):
        model, tokenizer = load_fp_model(spec.model, spec.dtype, spec.device, spec.seed)
    quantize(spec, model, tokenizer, timings)
    log.info("evaluating %s", ", ".join(spec.tasks))
    with timed(timings, "evaluate_s"):
        return evaluation.run(model, tokenizer, spec.tasks, spec.settings)


def run(cfg: dict, store_root: str = "results", force: bool = False, sweep: str | None = None,
        wandb_cfg: dict | None = None, spec: runspec.RunSpec | None = None) -> dict:
    """Run one configuration (a resolved Hydra config as a dict; ``spec``: its RunSpec when the
    caller has built it) and return its record.

    Invalid configs raise ConfigError before any work. A finished run is skipped unless
    ``force``; a run that fails is recorded with status "failed" and its traceback.
    """
    spec = spec or runspec.build(cfg)
    try:
        wandb_logger = tracking.WandbLogger(**(wandb_cfg or {}))
    except (TypeError, ValueError) as err:
        raise runspec.ConfigError(f"bad wandb settings: {err}") from None
    semantic = spec.semantic()
    store = ResultStore(store_root)
    key = spec_key(semantic)
    if store.is_done(key) and not force:
        log.info("skipping %s %s %s: already in %s", spec.model["name"], spec.method["name"],
                 spec.quant.name, store.path_for(key))
        return store.get(key)
    timings: dict = {}
    fields = dict(sweep=sweep, device=spec.device, dtype=spec.dtype, seed=spec.seed)
    with timed(timings, "total_s"):
        try:
            metrics = execute(spec, timings)
            status, error = "done", None
        except Exception:  # recorded, so that a sweep goes on
            metrics, status, error = {}, "failed", traceback.format_exc()
            log.error("run failed: %s", error.strip().splitlines()[-1])
    record = new_record(semantic, status=status, error=error, metrics=metrics, timings=timings, **fields)
    store.write(record)
    log.info("wrote %s (%s)", store.path_for(key), status)
    wandb_logger.log_record(record)
    return record


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
