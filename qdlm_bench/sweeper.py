"""The sweeper of ``run.py -m`` (``hydra.sweeper._target_`` in conf/config.yaml): Hydra's basic
sweeper (the cartesian product of the sweep lists, in Hydra's job order) with two additions.

- **Grids.** ``hydra.sweeper.grids``: a list of sweep-list dicts. The sweep is the union of their
  products, one grid after the other, each taken with ``hydra.sweeper.params`` and the command
  line (whose values win over both, as over ``params``). Hydra's ``params`` alone is one product;
  a study whose methods have different bit settings is several (conf/experiment/qdlm_study.yaml).
- **Jobs per task.** A job whose configuration says ``shard: task`` becomes one job per task of its
  ``tasks``, in their order, each with ``tasks=[<task>]`` in place of its own ``tasks`` override:
  each task its own job and record. A record's key is that of the same run with ``tasks=[<task>]``
  (``shard`` is not part of it). ``shard: none`` (the default) keeps the job whole.

``expand`` is the whole expansion; the sweeper launches its jobs, ``sweep_report.job_overrides``
checks them before the first starts and ``sweep_jobs.expand`` (the plan) lists them, so all three
see the same jobs. A job's ``shard`` and ``tasks`` are read from its composed configuration (the
defaults composed once per set of config-group choices, ``sweep_report.compose_job``).
"""

from __future__ import annotations

from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from qdlm_bench.paths import CONF_DIR

SHARDS = ("none", "task")  # shard=none: one job per configuration; task: one job per (configuration, task)


def checkpoint_folder(root: str | None, hub_id: str | None) -> str | None:
    """``<root>/<hub_id>`` (resolver ``${checkpoint:root,hub_id}``: the experiment qdlm_study's
    ``checkpoints=<folder>`` for each model); None when ``root`` is None (then model.path is unset)."""
    if root is None:
        return None
    if not hub_id:
        raise ValueError(f"checkpoints={root}: the model has no hub_id to find its folder under it; "
                         "pass model.path=<folder>")
    return f"{str(root).rstrip('/')}/{hub_id}"


def register() -> None:
    """The configs' resolver ``checkpoint`` and the sweeper plugin (``hydra_plugins.qdlm_bench_sweeper``,
    which Hydra's plugin scan misses in an editable install: its namespace path is an import hook).
    The plugin's module is imported after Hydra's scan, which re-executes the module of BasicSweeper."""
    from hydra.core.plugins import Plugins

    if not OmegaConf.has_resolver("checkpoint"):
        OmegaConf.register_new_resolver("checkpoint", checkpoint_folder)
    plugins = Plugins.instance()  # the scan, first
    from hydra_plugins.qdlm_bench_sweeper import QdlmSweeper

    plugins.register(QdlmSweeper)


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


def grid_arguments(params: dict | None, grids: list | None, arguments: list[str]) -> list[list[str]]:
    """The override list of each grid: ``params``, the grid's lists, then the command line."""
    common = [f"{k}={v}" for k, v in (params or {}).items()]
    return [common + [f"{k}={v}" for k, v in (grid or {}).items()] + list(arguments) for grid in (grids or [{}])]


def _task_names(tasks: Any) -> list[str] | None:
    """The task list of a composed ``tasks`` value (a name is a one-task list); None if malformed
    (the job's own check then says what is wrong)."""
    from qdlm_bench import runspec

    try:
        return runspec.task_list(tasks)
    except runspec.ConfigError:
        return None


def job_runs(plain: dict) -> list[dict]:
    """The runs of one job: the job itself, or with ``shard=task`` one run per task of its list
    (a sweep's jobs are split already; a single run makes its tasks' runs in order). Raises
    ``runspec.ConfigError`` for a bad ``shard`` or ``tasks``."""
    from qdlm_bench import runspec

    if plain.get("shard") not in SHARDS:
        raise runspec.ConfigError(f"shard={plain.get('shard')!r}; use one of {', '.join(SHARDS)}")
    tasks = runspec.task_list(plain["tasks"])
    if plain["shard"] == "none" or len(tasks) == 1:
        return [plain]
    return [{**plain, "tasks": [task]} for task in tasks]


def shard(jobs: list[list[str]], config: DictConfig, loader, cache: dict | None = None) -> list[list[str]]:
    """``jobs`` with each job whose configuration says ``shard: task`` replaced by one job per task
    (``tasks=[<task>]`` replacing the job's ``tasks`` override). ``config``: the sweep's master
    config; ``cache``: composed defaults, shared with other calls (``compose_job``)."""
    cache = {} if cache is None else cache
    parser = OverridesParser.create()
    out = []
    for job in jobs:
        composed = compose_job(loader, config, job, cache)
        tasks = _task_names(OmegaConf.to_container(composed, resolve=False).get("tasks"))
        if composed.get("shard") != "task" or not tasks:
            out.append(list(job))
            continue
        rest = [o.input_line for o in parser.parse_overrides(list(job)) if o.key_or_group != "tasks"]
        out.extend(rest + [f"tasks=[{task}]"] for task in tasks)
    return out


def expand(config: DictConfig, loader, arguments: list[str], cache: dict | None = None) -> list[list[str]]:
    """Every job of a sweep, in launch order: the grids' products (``hydra.sweeper.params`` and
    ``grids`` of ``config``, the master config, with the command line's ``arguments``), sharded."""
    sweeper = config.hydra.sweeper
    params = OmegaConf.to_container(sweeper.params, resolve=False) if sweeper.get("params") is not None else None
    grids = OmegaConf.to_container(sweeper.grids, resolve=False) if sweeper.get("grids") is not None else None
    parser = OverridesParser.create(config_loader=loader)
    jobs = []
    for grid in grid_arguments(params, grids, arguments):
        jobs += [job for batch in BasicSweeper.split_arguments(parser.parse_overrides(grid), None) for job in batch]
    return shard(jobs, config, loader, cache)


class GridShardSweeper:
    """What the project's sweeper adds to Hydra's BasicSweeper: it launches ``expand``'s jobs
    (``max_batch_size`` per launch). A mixin: the class Hydra instantiates is
    ``hydra_plugins.qdlm_bench_sweeper.QdlmSweeper(GridShardSweeper, BasicSweeper)``, made where Hydra
    scans for plugins, after its scan has re-executed the module of BasicSweeper (a class derived from
    it before that would not be Hydra's BasicSweeper)."""

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict] = None,
                 grids: Optional[list] = None) -> None:
        super().__init__(max_batch_size, params)
        self.grids = grids
        self._composed: dict = {}

    def sweep(self, arguments: list[str]) -> Any:
        self._arguments = list(arguments)
        return super().sweep(arguments)

    def split_arguments(self, overrides, max_batch_size):  # noqa: ARG002 (BasicSweeper.sweep's call)
        """The batches of ``expand``'s jobs (BasicSweeper.sweep passes its parsed ``params`` and
        command line; the jobs are built from the config and the command line instead)."""
        jobs = expand(self.config, self.hydra_context.config_loader, self._arguments, self._composed)
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))

    def validate_batch_is_legal(self, batch) -> None:
        """Each job composes (as Hydra checks), its defaults composed once per set of group choices."""
        for overrides in batch:
            compose_job(self.hydra_context.config_loader, self.config, list(overrides), self._composed)
