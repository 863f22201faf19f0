"""Speed and memory benchmarks, each against a baseline measured in the same run.

    python -m qdlm_bench.bench <name> [key=value ...] [out=result.json]

Each benchmark is a module here with a ``run(argv) -> dict`` function listed in ``BENCHES``;
its module docstring lists its arguments.
"""
