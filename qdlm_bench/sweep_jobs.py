"""The jobs of a ``run.py`` / ``qdlm-bench`` command line, without running them: Hydra's own
override grammar, sweeper expansion and composition over the packaged configs (``CONF_DIR``).

    jobs = expand(["method=fp,rtn", "bits=w4a16,w8a8"])         # [["method=fp", "bits=w4a16"], ...]
    cfgs = [compose(job) for job in jobs]                       # resolved plain dicts, as cli.main sees

``expand`` does what ``hydra.main`` does with ``-m``: compose the master config in MULTIRUN mode,
take the sweeper's ``hydra.sweeper.params`` and ``grids`` (an experiment's sweep lists) followed by
the command line's task overrides and expand them as the sweeper does (``sweeper.expand``: Hydra's
cartesian product per grid, in Hydra's job order; ``shard=task`` jobs split per task). Without
``multirun`` the command line is one job, composed as a plain run (a sweep value is then Hydra's
error, as ``run.py`` without ``-m``). ``compose`` builds one job's config as the launcher does
(``load_sweep_config``: the command line's ``hydra.*`` overrides plus the job's), minus the
``hydra`` node, resolved. Errors are Hydra's exceptions (``hydra.errors.HydraException``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from omegaconf import OmegaConf

from qdlm_bench.paths import CONF_DIR

CONFIG_NAME = "config"


@contextmanager
def _hydra():
    """Hydra's global state over the packaged configs (restored afterwards)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not OmegaConf.has_resolver("pid"):  # conf/config.yaml's output folders (as cli.py registers it)
        OmegaConf.register_new_resolver("pid", os.getpid)
    from qdlm_bench.sweeper import register

    register()
    saved = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    if saved:
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qdlm_bench"):
            yield GlobalHydra.instance().hydra
    finally:
        if saved:
            GlobalHydra.instance().initialize(saved)


def expand(overrides: list[str], multirun: bool = True) -> list[list[str]]:
    """The override list of every job of ``overrides`` (a command line's, without ``-m``), in the
    order the sweeper launches them (``sweeper.expand``: grids, ``shard=task``); when not ``multirun``
    one job, or with ``shard=task`` its tasks' runs, in the order the run makes them."""
    from hydra.types import RunMode

    from qdlm_bench import sweeper

    with _hydra() as hydra:
        mode = RunMode.MULTIRUN if multirun else RunMode.RUN
        master = hydra.compose_config(CONFIG_NAME, list(overrides), run_mode=mode, with_log_configuration=False)
        task = list(OmegaConf.to_container(master.hydra.overrides.task, resolve=False))
        if not multirun:  # one run; with shard=task its tasks run one after another (cli.run_job)
            return sweeper.shard([task], master, hydra.config_loader)
        return sweeper.expand(master, hydra.config_loader, task)


def hydra_overrides(overrides: list[str]) -> list[str]:
    """The ``hydra.*`` overrides of a command line (each job is composed with them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.input_line for o in parsed if o.is_hydra_override()]


def compose(job: list[str], overrides: list[str] = ()) -> dict:
    """One job's resolved configuration (a plain dict, without the ``hydra`` node), as the launcher
    composes it; ``overrides``: the whole command line, for its ``hydra.*`` overrides."""
    from hydra.types import RunMode

    with _hydra() as hydra:
        cfg = hydra.config_loader.load_configuration(
            CONFIG_NAME, hydra_overrides(overrides) + list(job), run_mode=RunMode.RUN)
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return OmegaConf.to_container(OmegaConf.create(plain), resolve=True)


def jobs(overrides: list[str], multirun: bool = True) -> list[tuple[list[str], dict]]:
    """``(job overrides, resolved config)`` of every job of a command line."""
    return [(job, compose(job, overrides)) for job in expand(overrides, multirun)]
