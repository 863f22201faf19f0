"""Hydra callback: when a sweep ends, print its report, write it to ``<sweep dir>/report`` and,
when wandb is on, log it to the sweep's wandb group.

A sweep's records are those its jobs produced or found already done (each job leaves the key of
its record in its output folder, ``JOB_RECORD``), plus every record stamped with the sweep's name
(earlier, interrupted invocations of a named sweep). Hydra loads this callback for every run, so
the report's imports (pandas) wait until a sweep ends."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qdlm_bench.store import ResultStore
from qdlm_bench.tracking import WandbLogger

JOB_RECORD = "record.key"  # in each job's output folder: the key of the record the job ran or skipped to


def sweep_records(store: ResultStore, sweep_dir: Path, name: str) -> list[dict]:
    """The records of a sweep's jobs and the records stamped with its name, each once."""
    keys = [p.read_text().strip() for p in sorted(sweep_dir.glob(f"*/{JOB_RECORD}"))]
    found = {r["key"]: r for r in store.records(sweep=name)}
    for key in keys:
        if key not in found and (record := store.get(key)) is not None:
            found[key] = record
    return sorted(found.values(), key=lambda r: str(r.get("created", "")))


class PrintSweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from qdlm_bench import report

        name = config.sweep or config.hydra.sweep.dir.rstrip("/").split("/")[-1]
        store = ResultStore(config.store)
        records = report.with_baselines(sweep_records(store, Path(config.hydra.sweep.dir), str(name)), store)
        if not records:
            print(f"no records of sweep {name} in {config.store}")
            return
        wandb_cfg = OmegaConf.to_container(config.wandb, resolve=True)
        report.make_report(records, Path(config.hydra.sweep.dir) / "report",
                           logger=WandbLogger(**wandb_cfg | {"group": str(name)}))
