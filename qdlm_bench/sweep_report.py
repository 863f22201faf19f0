"""Hydra callback: when a sweep ends, print its report, write it to ``<sweep dir>/report`` and,
when wandb is on, log it to the sweep's wandb group."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qdlm_bench import report
from qdlm_bench.store import ResultStore
from qdlm_bench.tracking import WandbLogger


class PrintSweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        name = config.sweep or config.hydra.sweep.dir.rstrip("/").split("/")[-1]
        store = ResultStore(config.store)
        records = report.with_baselines(store.records(sweep=str(name)), store)
        if not records:
            print(f"no records of sweep {name} in {config.store}")
            return
        wandb_cfg = OmegaConf.to_container(config.wandb, resolve=True)
        report.make_report(records, Path(config.hydra.sweep.dir) / "report",
                           logger=WandbLogger(**wandb_cfg | {"group": str(name)}))
