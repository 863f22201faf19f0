"""The project's sweeper where Hydra looks for plugins (the ``hydra_plugins`` namespace): Hydra
instantiates a sweeper only from there. What it adds to Hydra's basic sweeper (grids,
``shard=task``) is ``qdlm_bench.sweeper``; conf/hydra/sweeper/qdlm.yaml selects it."""

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from qdlm_bench import sweeper


class QdlmSweeper(sweeper.GridShardSweeper, BasicSweeper):
    """Hydra's BasicSweeper with ``qdlm_bench.sweeper.GridShardSweeper``'s expansion."""
