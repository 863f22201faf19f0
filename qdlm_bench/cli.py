"""The ``qdlm-bench`` command, also run by ``python run.py``: one study configuration per run,
``-m`` sweeps, with the packaged Hydra configs (``qdlm_bench.paths.CONF_DIR``).

    qdlm-bench -m method=fp,rtn bits=w4a16,w8a8

The configuration is validated before the heavy packages (torch, lm-eval, transformers) load,
so that a bad option fails in seconds: exit status 2 and "invalid configuration: <reason>". A sweep
checks every job before the first one starts and reports all the bad ones at once (exit status 2).

Exit status: 0 every run done (or found done); 1 a run failed (its record has status "failed"; a
sweep prints its table first); 2 invalid configuration, nothing run (Hydra's own composition errors,
such as ``model=nosuch``, included).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qdlm_bench import gpu_pool
from qdlm_bench.paths import CONF_DIR
from qdlm_bench.sweep_report import JOB_INVALID, JOB_RECORD, OUTCOME, check_store
from qdlm_bench.sweeper import job_runs, register

log = logging.getLogger("qdlm_bench")
# output folders (conf/config.yaml); cached, so that a launcher's worker resolves the sweep folder to the
# launching process's pid, as the config it was given (Hydra copies resolver caches into each job's config)
OmegaConf.register_new_resolver("pid", os.getpid, replace=True, use_cache=True)
OmegaConf.register_new_resolver("gpu_pool_size", gpu_pool.pool_size, replace=True)  # conf/hydra/launcher/local_gpus.yaml
register()  # the sweeper plugin (conf/hydra/sweeper/qdlm.yaml) and ${checkpoint:...} (experiment qdlm_study)
GROUPS = ("model", "method", "calib", "eval", "experiment", "dllmquant_ladder")  # conf/ folders
BASELINE = ("auto", "skip")  # auto: each quantized job of a sweep makes sure its FP baseline record exists


def sweep_name(cfg: DictConfig) -> str | None:
    """The configured sweep name, else the multirun folder's name (None for a single run)."""
    if cfg.sweep:
        return str(cfg.sweep)
    hc = HydraConfig.get()
    return hc.sweep.dir.rstrip("/").split("/")[-1] if hc.mode == RunMode.MULTIRUN else None


def bad_group_choice(args: list[str]) -> str | None:
    """The problem of a command line's first unknown config-group choice (``model=nosuch``), naming
    the close ones and every available one; None when all are known (Hydra reports syntax errors)."""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # Hydra's own message says what is wrong
        return None
    for o in overrides:
        group = o.key_or_group
        if group not in GROUPS or o.package is not None or o.is_delete():
            continue
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                continue
            values = list(o.sweep_string_iterator())
        else:
            values = [o.get_value_element_as_str()]
        available = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        for value in values:
            if value not in available:
                close = difflib.get_close_matches(value, available, n=1)
                hint = f" (did you mean {group}={close[0]}?)" if close else ""
                return f"{group}={value}: no such {group} in {CONF_DIR / group}{hint}; available: {', '.join(available)}"
    return None


def main() -> None:
    """The command: Hydra runs ``run_job`` (one run, or each job of a ``-m`` sweep); the exit status
    says what happened (module docstring)."""
    OUTCOME.update(composed=False, failed=[], invalid=[])
    problem = bad_group_choice(sys.argv[1:])
    if problem:
        print(f"invalid configuration: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        run_job()
    except SystemExit as exc:
        if exc.code == 1 and not OUTCOME["composed"]:  # Hydra could not compose the config (it printed why)
            print("invalid configuration: Hydra could not compose it (its reason is above); a key that is not "
                  "in a section's yaml takes a leading + (+method.<key>=...), and is then checked against the "
                  "section's valid keys", file=sys.stderr)
            sys.exit(2)
        raise
    if OUTCOME["invalid"]:
        sys.exit(2)
    if OUTCOME["failed"]:
        sys.exit(1)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def run_job(cfg: DictConfig) -> None:
    OUTCOME["composed"] = True
    if HydraConfig.get().runtime.choices.get("hydra/launcher") == gpu_pool.LAUNCHER:
        gpu_pool.pin()  # this worker's one GPU, before anything touches CUDA in it
    # imported once Hydra has composed the config: its error report inspects every loaded module,
    # which loads the lazily imported ones (torch)
    from qdlm_bench import runspec

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    plain = OmegaConf.to_container(cfg, resolve=True)
    records = []
    try:
        check_store(plain, None, {})  # a file or unwritable store: before torch loads
        parts = job_runs(plain)
        specs = [runspec.build(part) for part in parts]  # every run checked before the first starts
        if cfg.baseline not in BASELINE:
            raise runspec.ConfigError(f"baseline={cfg.baseline!r}; use one of {', '.join(BASELINE)}")
        for part, spec in zip(parts, specs):
            check_store(part, spec, {})  # a file or unwritable store, an unreadable record at the key
        from qdlm_bench import pipeline  # torch, lm-eval, transformers: only once the config is valid

        run_args = dict(store_root=cfg.store, sweep=sweep_name(cfg),
                        wandb_cfg=plain["wandb"] | {"group": sweep_name(cfg)})
        for part, spec in zip(parts, specs):
            if cfg.baseline == "auto" and multirun:
                pipeline.ensure_baseline(part, **run_args)
            records.append(pipeline.run(part, force=cfg.force, spec=spec, **run_args))
    except runspec.ConfigError as err:
        log.error("invalid configuration: %s", err)
        if not multirun:
            sys.exit(2)
        OUTCOME["invalid"].append(str(err))  # the sweep goes on; its exit status will be 2
        Path(HydraConfig.get().runtime.output_dir, JOB_INVALID).write_text(str(err))  # a worker's, for the sweep
        return
    finally:  # for the sweep report: the key of each record the job ran or found done, one per line
        if records:
            Path(HydraConfig.get().runtime.output_dir, JOB_RECORD).write_text("\n".join(r["key"] for r in records))
    for record in records:
        summary = ", ".join(f"{task} {m['metric']}={m['value']:.4f}" for task, m in record["metrics"].items())
        log.info("%s | %s | %s | %s", record["model"], record["method"], record["bits"], summary or record["status"])
        if record["status"] == "failed":
            OUTCOME["failed"].append(record["key"])
            if not multirun:
                log.error("exit status 1: the run failed; its record (with the traceback): %s",
                          Path(cfg.store, f"{record['key']}.json"))


if __name__ == "__main__":
    main()
