"""Entry point: ``python -m qdlm_bench.bench <name> [key=value ...]`` prints (and saves) JSON."""

from __future__ import annotations

import importlib
import json
import sys

BENCHES = ("sampler", "likelihood", "forward", "quantize", "config_errors", "sandbox", "decode", "artifact", "runtime")


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHES:
        raise SystemExit(f"usage: python -m qdlm_bench.bench {{{'|'.join(BENCHES)}}} [key=value ...]")
    out = next((x.split("=", 1)[1] for x in argv if x.startswith("out=")), "")
    result = importlib.import_module(f"qdlm_bench.bench.{argv[0]}").run(argv[1:])
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
