"""Hydra entry point of a checkout: `python run.py` runs one study configuration; `-m` sweeps.

    python run.py -m method=fp,rtn bits=w4a16,w8a8

The same as the installed `qdlm-bench` command (qdlm_bench.cli).
"""

from qdlm_bench.cli import main

if __name__ == "__main__":
    main()
