"""Weights & Biases tracking: one wandb run per result record, grouped by sweep, and one per analysis
(a report, an outlier or step-error study) with its tables, figures and files.

mode "disabled" does nothing and never imports wandb; "offline" writes the run under `dir`
(upload later with `wandb sync <dir>/wandb/offline-run-*`); "online" streams it to the server.
"""

from __future__ import annotations

import json
import numbers
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MODES = ("disabled", "offline", "online")
# a record's fields in its wandb run's summary (with its flattened metrics): the same values as the record's
SUMMARY_FIELDS = ("status", "error", "fault", "key", "baseline_key", "model", "method", "bits", "created")


def flatten_metrics(record: dict) -> dict[str, float]:
    """{"<task>/<metric>": value} for every numeric metric of every task (each task's "all" dict,
    else its primary value and stderr) and {"time/<name>": seconds} for the timings."""
    flat = {}
    for task, result in (record.get("metrics") or {}).items():
        values = result.get("all") or {result.get("metric", "value"): result.get("value"),
                                       "stderr": result.get("stderr")}
        flat.update({f"{task}/{name}": v for name, v in values.items()})
    flat.update({f"time/{name}": v for name, v in (record.get("timings") or {}).items()})
    return {k: v for k, v in flat.items() if isinstance(v, numbers.Real) and not isinstance(v, bool)}


@dataclass(frozen=True)
class WandbLogger:
    """Logs result records to wandb; build it from the `wandb` config group: WandbLogger(**cfg)."""

    mode: str = "disabled"
    project: str = "qdlm-bench"
    entity: str | None = None
    group: str | None = None  # default: the record's sweep name (analyses: none)
    dir: str | Path | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"wandb mode must be one of {MODES}, got {self.mode!r}")

    @contextmanager
    def _run(self, name: str | None, job_type: str, group: str | None, config: dict, tags: list[str]):
        """A wandb run, finished and flushed on exit."""
        import wandb

        if self.dir is not None:
            Path(self.dir).mkdir(parents=True, exist_ok=True)
        with wandb.init(
            mode=self.mode, project=self.project, entity=self.entity, dir=self.dir,
            group=self.group or group, job_type=job_type, name=name, tags=tags, config=config,
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
        ) as run:
            yield run
        if wandb.run is None:  # wandb-core writes the run file lazily; shutting it down flushes it
            wandb.teardown()

    def log_record(self, record: dict) -> Path | None:
        """Log `record` as one finished wandb run: config = spec; metrics flattened as
        <task>/<metric> and time/<name>; SUMMARY_FIELDS (status, error, fault, keys) in the summary;
        the record JSON as a "result-record" artifact. The pipeline passes the record as read back
        from its file, failed runs included, so wandb and the store agree. Returns the run's local
        folder (None when disabled)."""
        if self.mode == "disabled":
            return None
        import wandb

        labels = [record.get(f) for f in ("model", "method", "bits")]
        name = "/".join(str(x) for x in labels if x is not None) or None
        with self._run(name, "eval", record.get("sweep"), record.get("spec") or {},
                       [str(x)[:64] for x in labels if x is not None]) as run:
            run.log(flatten_metrics(record))
            run.summary.update({f: record.get(f) for f in SUMMARY_FIELDS})
            artifact = wandb.Artifact(f"record-{record['key']}", type="result-record",
                                      metadata={f: record.get(f) for f in ("key", "model", "method", "bits", "status")})
            with artifact.new_file("record.json") as f:
                json.dump(record, f, indent=2)
            run.log_artifact(artifact)
        return Path(run.settings.sync_dir)

    def log_outputs(self, name: str, job_type: str, *, tables: dict | None = None, images: list = (),
                    files: list = (), config: dict | None = None, summary: dict | None = None) -> Path | None:
        """Log an analysis (a report, an outlier study...) as one wandb run: each DataFrame of
        ``tables`` as a wandb Table ``table/<key>``, each image file as ``figure/<file stem>``,
        ``summary`` in the summary, and every path in ``files`` in an artifact of type ``job_type``.
        Returns the run's local folder (None when disabled)."""
        if self.mode == "disabled":
            return None
        import wandb

        with self._run(name, job_type, None, config or {}, [job_type]) as run:
            run.log({**{f"table/{k}": wandb.Table(dataframe=df) for k, df in (tables or {}).items()},
                     **{f"figure/{Path(p).stem}": wandb.Image(str(p)) for p in images}})
            run.summary.update(summary or {})
            if files:
                artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]+", "_", f"{job_type}-{name}"), type=job_type)
                for path in files:
                    artifact.add_file(str(path))
                run.log_artifact(artifact)
        return Path(run.settings.sync_dir)
