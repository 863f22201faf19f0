"""Hydra callback of a sweep (``-m``): before its first job, every job's configuration is checked
(``validate_jobs``: all the bad ones reported at once, exit status 2, no job started); when it
ends, its report is printed, written to ``<sweep dir>/report`` and, when wandb is on, logged to the
sweep's wandb group, and the jobs whose record failed are counted in ``OUTCOME`` (the command then
exits 1).

A sweep's records are those its jobs produced or found already done (each job leaves the key of
its record in its output folder, ``JOB_RECORD``), plus every record stamped with the sweep's name
(earlier, interrupted invocations of a named sweep). Hydra loads this callback for every run, so
the report's imports (pandas) wait until a sweep ends."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qdlm_bench import sweeper
from qdlm_bench.store import CorruptRecordError, ResultStore
from qdlm_bench.tracking import WandbLogger

JOB_RECORD = "record.key"  # in each job's output folder: the keys of the records the job ran or skipped to
JOB_INVALID = "invalid.txt"  # in a job's output folder: why its configuration was invalid (a launcher's worker)
log = logging.getLogger("qdlm_bench")
# what the command's exit status reports (cli.main): Hydra composed a config (so a Hydra exit 1 after it
# is no configuration error), the keys of failed records, jobs whose configuration was invalid
OUTCOME: dict = {"composed": False, "failed": [], "invalid": []}


def job_overrides(config: DictConfig, cache: dict | None = None) -> list[list[str]]:
    """The override lists of a sweep's jobs, in launch order (``sweeper.expand``: the sweep lists
    of ``hydra.sweeper``, then the command line's task overrides; ``shard=task`` jobs split)."""
    from hydra.core.global_hydra import GlobalHydra

    task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    return sweeper.expand(config, GlobalHydra.instance().config_loader(), task, cache)


def check_job(plain: dict, stores: dict) -> None:
    """One job's configuration as its run will check it (``shard``; ``runspec.build`` and ``baseline``
    of each of its runs), plus its store (``check_store``). Raises ``runspec.ConfigError``."""
    from qdlm_bench import runspec

    for part in sweeper.job_runs(plain):
        spec = runspec.build(part)
        if part.get("baseline") not in ("auto", "skip"):
            raise runspec.ConfigError(f"baseline={part.get('baseline')!r}; use one of auto, skip")
        check_store(part, spec, stores)


def check_store(plain: dict, spec, stores: dict) -> None:
    """The job's store is writable (checked once per store in ``stores``) and, unless ``force``,
    holds no unreadable record at the key of ``spec`` (None: the store alone); raises
    ``runspec.ConfigError``."""
    from qdlm_bench import runspec
    from qdlm_bench.store import ResultStore, spec_key

    root = str(plain["store"])
    if spec is None:  # before the configuration check: look, create nothing
        path = Path(root).expanduser().absolute()
        above = next(p for p in (path, *path.parents) if p.exists())
        if not above.is_dir():
            where = "is a file" if above == path else f"lies under {above}, a file"
            raise runspec.ConfigError(f"result store {path} {where}, not a folder; move the file away or pass "
                                      "store=<a writable folder>")
        return
    if root not in stores:
        stores[root] = ResultStore(root)
        if hasattr(stores[root], "check_writable"):
            try:
                stores[root].check_writable()
            except ValueError as err:
                raise runspec.ConfigError(str(err)) from None
    if spec is not None and not plain.get("force"):
        try:
            stores[root].get(spec_key(spec.semantic()))
        except ValueError as err:  # store.CorruptRecordError
            raise runspec.ConfigError(str(err)) from None


def validate_jobs(config: DictConfig) -> list[tuple[int, list[str], str]]:
    """``(job number, overrides, reason)`` of every job of the sweep whose configuration is invalid.
    Each job is composed as the launcher composes it; identical resolved configs are checked once."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qdlm_bench import runspec

    loader = GlobalHydra.instance().config_loader()
    bad, seen, stores, composed = [], {}, {}, {}
    for num, overrides in enumerate(job_overrides(config, composed)):
        try:
            job = sweeper.compose_job(loader, config, overrides, composed)
            with_hydra = OmegaConf.to_container(job, resolve=False)
            with_hydra.pop("hydra", None)
            plain = OmegaConf.to_container(OmegaConf.create(with_hydra), resolve=True)
            text = json.dumps(plain, sort_keys=True, default=str)
            if text not in seen:
                try:
                    check_job(plain, stores)
                    seen[text] = None
                except runspec.ConfigError as err:
                    seen[text] = str(err)
            reason = seen[text]
        except (HydraException, OmegaConfBaseException) as err:
            reason = f"{type(err).__name__}: {err}".replace("\n", " ")
        if reason:
            bad.append((num, list(overrides), reason))
    return bad


def job_keys(sweep_dir: Path) -> list[str]:
    """The record keys the sweep's jobs left (``JOB_RECORD``: one per line, one per run of a job)."""
    return [key for p in sorted(sweep_dir.glob(f"*/{JOB_RECORD}")) for key in p.read_text().split()]


def sweep_records(store: ResultStore, sweep_dir: Path, name: str) -> list[dict]:
    """The records of a sweep's jobs and the records stamped with its name, each once."""
    keys = job_keys(sweep_dir)
    found = {r["key"]: r for r in store.records(sweep=name)}
    for key in keys:
        if key in found:
            continue
        try:
            record = store.get(key)
        except CorruptRecordError:  # store.records() already warned of it and skipped it
            continue
        if record is not None:
            found[key] = record
    return sorted(found.values(), key=lambda r: str(r.get("created", "")))


def invalid_jobs(sweep_dir: Path) -> list[str]:
    """Why each of the sweep's jobs found its configuration invalid (``JOB_INVALID``): a job run by a
    launcher's worker process cannot report it to the sweep's ``OUTCOME`` otherwise."""
    return [p.read_text() for p in sorted(sweep_dir.glob(f"*/{JOB_INVALID}"))]


def failed_jobs(store: ResultStore, sweep_dir: Path) -> list[dict]:
    """The failed records the sweep's jobs ran (each job's ``JOB_RECORD``)."""
    failed = []
    for key in job_keys(sweep_dir):
        try:
            record = store.get(key)
        except CorruptRecordError:  # an unreadable record: not this sweep's to judge
            continue
        if record is not None and record.get("status") == "failed":
            failed.append(record)
    return failed


class PrintSweepReport(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """Check every job before the first one starts; any bad one: all reported, exit status 2."""
        OUTCOME.update(composed=True, failed=[], invalid=[])
        start = time.perf_counter()
        bad = validate_jobs(config)
        if bad:
            jobs = job_overrides(config)
            shared = set.intersection(*(set(j) for j in jobs)) if len(jobs) > 1 else set()
            lines = "\n".join(f"  #{num} {' '.join(o for o in ov if o not in shared) or ' '.join(ov)}: {reason}"
                               for num, ov, reason in bad)
            n = len(jobs)
            log.error("invalid configuration: %d of the sweep's %d jobs; no job was started:\n%s", len(bad), n, lines)
            raise SystemExit(2)
        log.info("checked the sweep's jobs in %.1f s", time.perf_counter() - start)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from qdlm_bench import report

        name = config.sweep or config.hydra.sweep.dir.rstrip("/").split("/")[-1]
        store = ResultStore(config.store)
        records = report.with_baselines(sweep_records(store, Path(config.hydra.sweep.dir), str(name)), store)
        if not records:
            print(f"no records of sweep {name} in {config.store}")
        else:
            wandb_cfg = OmegaConf.to_container(config.wandb, resolve=True)
            report.make_report(records, Path(config.hydra.sweep.dir) / "report",
                               logger=WandbLogger(**wandb_cfg | {"group": str(name)}))
        failed = failed_jobs(store, Path(config.hydra.sweep.dir))
        OUTCOME["failed"] = sorted({*OUTCOME["failed"], *(r["key"] for r in failed)})
        OUTCOME["invalid"] = sorted({*OUTCOME["invalid"], *invalid_jobs(Path(config.hydra.sweep.dir))})
        for record in failed:
            error = (record.get("error") or "").strip().splitlines()
            print(f"FAILED {record['model']} {record['method']} {record['bits']}: "
                  f"{error[-1] if error else 'no error recorded'} ({store.path_for(record['key'])})")
        if OUTCOME["failed"] or OUTCOME["invalid"]:
            print(f"{len(OUTCOME['failed'])} failed and {len(OUTCOME['invalid'])} invalid job(s): exit status "
                  f"{2 if OUTCOME['invalid'] else 1}")
