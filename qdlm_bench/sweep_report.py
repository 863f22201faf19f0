"""Hydra callback: print the study table of a sweep's records when the sweep ends."""

from __future__ import annotations

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from qdlm_bench import report


class PrintSweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        name = config.sweep or config.hydra.sweep.dir.rstrip("/").split("/")[-1]
        report.main(["--store", str(config.store), "--sweep", str(name)])
