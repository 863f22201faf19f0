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

from qdlm_bench.paths import CONF_DIR
from qdlm_bench.store import CorruptRecordError, ResultStore
from qdlm_bench.tracking import WandbLogger

JOB_RECORD = "record.key"  # in each job's output folder: the key of the record the job ran or skipped to
log = logging.getLogger("qdlm_bench")
# what the command's exit status reports (cli.main): Hydra composed a config (so a Hydra exit 1 after it
# is no configuration error), the keys of failed records, jobs whose configuration was invalid
OUTCOME: dict = {"composed": False, "failed": [], "invalid": []}


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The override lists of a sweep's jobs, in Hydra's order: what BasicSweeper expands
    (``hydra.sweeper.params``, then the command line's task overrides)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    task = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    batches = BasicSweeper.split_arguments(parser.parse_overrides(params + task), None)
    return [list(job) for batch in batches for job in batch]


def check_job(plain: dict, stores: dict) -> None:
    """One job's configuration as its run will check it (``runspec.build``, ``baseline``), plus
    its store (``check_store``). Raises ``runspec.ConfigError``."""
    from qdlm_bench import runspec

    spec = runspec.build(plain)
    if plain.get("baseline") not in ("auto", "skip"):
        raise runspec.ConfigError(f"baseline={plain.get('baseline')!r}; use one of auto, skip")
    check_store(plain, spec, stores)


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


def compose_job(loader, config: DictConfig, overrides: list[str], cache: dict) -> DictConfig:
    """A job's config as the launcher composes it (``load_sweep_config``), the defaults list composed
    once per distinct set of config-group choices (``cache``) and the job's value overrides then
    applied to a copy, as Hydra applies them after composing the defaults."""
    import copy

    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        apply = ConfigLoaderImpl._apply_overrides_to_config
    except (ImportError, AttributeError):  # another Hydra: compose each job whole
        return loader.load_sweep_config(config, list(overrides))
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    is_group = [o.key_or_group.split("/")[0] in groups | {"hydra"} or o.package is not None for o in parsed]
    key = tuple(o.input_line for o, g in zip(parsed, is_group) if g)
    if key not in cache:
        cache[key] = loader.load_sweep_config(config, list(key))
    job = copy.deepcopy(cache[key])
    apply([o for o, g in zip(parsed, is_group) if not g], job)
    return job


def validate_jobs(config: DictConfig) -> list[tuple[int, list[str], str]]:
    """``(job number, overrides, reason)`` of every job of the sweep whose configuration is invalid.
    Each job is composed as the launcher composes it; identical resolved configs are checked once."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from qdlm_bench import runspec

    loader = GlobalHydra.instance().config_loader()
    bad, seen, stores, composed = [], {}, {}, {}
    for num, overrides in enumerate(job_overrides(config)):
        try:
            job = compose_job(loader, config, overrides, composed)
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


def sweep_records(store: ResultStore, sweep_dir: Path, name: str) -> list[dict]:
    """The records of a sweep's jobs and the records stamped with its name, each once."""
    keys = [p.read_text().strip() for p in sorted(sweep_dir.glob(f"*/{JOB_RECORD}"))]
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


def failed_jobs(store: ResultStore, sweep_dir: Path) -> list[dict]:
    """The failed records the sweep's jobs ran (each job's ``JOB_RECORD``)."""
    failed = []
    for path in sorted(sweep_dir.glob(f"*/{JOB_RECORD}")):
        try:
            record = store.get(path.read_text().strip())
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
        for record in failed:
            error = (record.get("error") or "").strip().splitlines()
            print(f"FAILED {record['model']} {record['method']} {record['bits']}: "
                  f"{error[-1] if error else 'no error recorded'} ({store.path_for(record['key'])})")
        if OUTCOME["failed"] or OUTCOME["invalid"]:
            print(f"{len(OUTCOME['failed'])} failed and {len(OUTCOME['invalid'])} invalid job(s): exit status "
                  f"{2 if OUTCOME['invalid'] else 1}")
