"""The ``qdlm-bench`` command, also run by ``python run.py``: one study configuration per run,
``-m`` sweeps, with the packaged Hydra configs (``qdlm_bench.paths.CONF_DIR``).

    qdlm-bench -m method=fp,rtn bits=w4a16,w8a8

The configuration is validated before the heavy packages (torch, lm-eval, transformers) load,
so that a bad option fails in seconds: exit status 2 and "invalid configuration: <reason>".
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

from qdlm_bench.paths import CONF_DIR
from qdlm_bench.sweep_report import JOB_RECORD

log = logging.getLogger("qdlm_bench")
OmegaConf.register_new_resolver("pid", os.getpid, replace=True)  # output folders: conf/config.yaml
BASELINE = ("auto", "skip")  # auto: each quantized job of a sweep makes sure its FP baseline record exists


def sweep_name(cfg: DictConfig) -> str | None:
    """The configured sweep name, else the multirun folder's name (None for a single run)."""
    if cfg.sweep:
        return str(cfg.sweep)
    hc = HydraConfig.get()
    return hc.sweep.dir.rstrip("/").split("/")[-1] if hc.mode == RunMode.MULTIRUN else None


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # imported once Hydra has composed the config: its error report inspects every loaded module,
    # which loads the lazily imported ones (torch)
    from qdlm_bench import runspec

    plain = OmegaConf.to_container(cfg, resolve=True)
    try:
        spec = runspec.build(plain)
        if cfg.baseline not in BASELINE:
            raise runspec.ConfigError(f"baseline={cfg.baseline!r}; use one of {', '.join(BASELINE)}")
        from qdlm_bench import pipeline  # torch, lm-eval, transformers: only once the config is valid

        run_args = dict(store_root=cfg.store, sweep=sweep_name(cfg),
                        wandb_cfg=plain["wandb"] | {"group": sweep_name(cfg)})
        if cfg.baseline == "auto" and HydraConfig.get().mode == RunMode.MULTIRUN:
            pipeline.ensure_baseline(plain, **run_args)
        record = pipeline.run(plain, force=cfg.force, spec=spec, **run_args)
    except runspec.ConfigError as err:
        log.error("invalid configuration: %s", err)
        sys.exit(2)
    Path(HydraConfig.get().runtime.output_dir, JOB_RECORD).write_text(record["key"])  # for the sweep report
    summary = ", ".join(f"{task} {m['metric']}={m['value']:.4f}" for task, m in record["metrics"].items())
    log.info("%s | %s | %s | %s", record["model"], record["method"], record["bits"], summary or record["status"])


if __name__ == "__main__":
    main()
