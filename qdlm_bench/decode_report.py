"""The "Fast decoding" table of the report: what each fast decoder (``decode``) costs in accuracy and
gains in speed, for each quantized model next to FP.

One table per model and setting (tasks, eval settings but the decoder, dtype, seed) that holds a
record of a fast decoder. Rows: (method, bits) as the study tables order them (FP first), each
with one row per decoder, ``exact`` first. Columns: the generation tasks (the ones a decoder
changes; %), their mean ``avg``, ``Δ vs exact`` (avg of this decoder minus avg of exact decoding
of the same quantized model, in points), ``Δ FP vs exact`` (the same for FP), ``speed-up``
(samples/s of this decoder over exact's, same model: generation time only) and ``fwd/sample``
(forward passes per generated sample; a batched pass counts for each of its rows), from the
``generation`` timings that records keep per task. The latest finished record of each
(method, bits, decoder) counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import pandas as pd

from qdlm_bench.decoders.config import label_of
from qdlm_bench.store import spec_key

AVG, DELTA, DELTA_FP, SPEEDUP, FORWARDS, RATE = ("avg", "Δ vs exact", "Δ FP vs exact", "speed-up", "fwd/sample",
                                                  "samples/s")
LEGEND = ("tasks and avg: % (generation tasks only: likelihood tasks do not decode); Δ: avg minus exact decoding's "
          "avg of the same model, in points (negative = the decoder costs accuracy); speed-up: samples/s of "
          "generation over exact's, same model and run settings; fwd/sample: forward passes per sample")


def decode_label(record: dict) -> str:
    return label_of(((record.get("spec") or {}).get("eval") or {}).get("decode"))


def _setting(spec: dict) -> str:
    """What a decoder's runs must share with exact decoding to be compared: all but the decoder."""
    evals = {k: v for k, v in (spec.get("eval") or {}).items() if k != "decode"}
    return spec_key({"model": spec.get("model"), "tasks": spec.get("tasks"), "eval": evals,
                     "dtype": spec.get("dtype"), "seed": spec.get("seed")})


def _row(record: dict) -> dict:
    metrics = record.get("metrics") or {}
    gen = {t: m for t, m in metrics.items() if isinstance(m.get("generation"), dict)}
    samples = sum(m["generation"]["samples"] for m in gen.values())
    seconds = sum(m["generation"]["seconds"] for m in gen.values())
    passes = sum(m["generation"]["forward_passes_per_sample"] * m["generation"]["samples"] for m in gen.values())
    values = {t: 100 * m["value"] if m.get("value") is not None else math.nan for t, m in gen.items()}
    return {"method": record.get("method"), "bits": "fp" if record.get("method") == "fp" else record.get("bits"),
            "precision": record.get("precision") or {}, "decode": decode_label(record), **values,
            RATE: samples / seconds if seconds else math.nan, FORWARDS: passes / samples if samples else math.nan}


def _order(row: dict) -> tuple:
    p = row["precision"]
    return (row["method"] != "fp", -p.get("w_bits", 16), -p.get("a_bits", 16), str(row["bits"]), str(row["method"]),
            row["decode"] != "exact", row["decode"])


def fast_decoding_tables(records: Iterable[dict]) -> list[pd.DataFrame]:
    """The Fast decoding table of every model and setting that holds a fast decoder's record."""
    groups: dict[tuple, dict] = {}
    for r in sorted((r for r in records if r.get("status") == "done"), key=lambda r: str(r.get("created"))):
        row = _row(r)
        groups.setdefault((r.get("model"), _setting(r.get("spec") or {})), {})[
            (row["method"], row["bits"], row["decode"])] = row  # the latest record wins
    kept = sorted(((group, rows) for group, rows in groups.items() if any(d != "exact" for _, _, d in rows)),
                  key=lambda g: (str(g[0][0]), g[0][1]))
    tables = [fast_decoding_table(model, list(rows.values())) for (model, _), rows in kept]
    models = [model for (model, _), _ in kept]
    for table, ((model, setting), _) in zip(tables, kept):
        if models.count(model) > 1:  # several settings of one model: the file names carry the setting
            table.attrs["name"] += f"-{setting[:8]}"
    return tables


def fast_decoding_table(model: str, rows: list[dict]) -> pd.DataFrame:
    """The table of one model and setting from its ``_row``s."""
    rows = sorted(rows, key=_order)
    tasks = list(dict.fromkeys(t for r in rows for t in r if t not in ("method", "bits", "precision", "decode",
                                                                          RATE, FORWARDS)))
    table = pd.DataFrame([{k: r.get(k, math.nan) for k in ("method", "bits", "decode", *tasks)} for r in rows])
    table[AVG] = table[tasks].mean(axis=1, skipna=False) if tasks else math.nan
    exact = {(r["method"], r["bits"]): (a, r[RATE]) for r, a in zip(rows, table[AVG]) if r["decode"] == "exact"}
    fp_delta = {}
    for r, a in zip(rows, table[AVG]):
        if r["method"] == "fp" and ("fp", "fp") in exact:
            fp_delta[r["decode"]] = a - exact[("fp", "fp")][0]
    base = [exact.get((r["method"], r["bits"]), (math.nan, math.nan)) for r in rows]
    table[DELTA] = [a - b[0] for a, b in zip(table[AVG], base)]
    table[DELTA_FP] = [fp_delta.get(r["decode"], math.nan) for r in rows]
    table[SPEEDUP] = [r[RATE] / b[1] if b[1] else math.nan for r, b in zip(rows, base)]
    table[FORWARDS] = [r[FORWARDS] for r in rows]
    table[RATE] = [r[RATE] for r in rows]
    title = f"Fast decoding: {model}"
    table.attrs = {"title": title, "name": "fast-decoding-" + "".join(c if c.isalnum() or c in "._-" else "_"
                                                                       for c in str(model)),
                   "model": model, "tasks": tasks,
                   "decimals": {**{t: 1 for t in tasks}, AVG: 1, DELTA: 1, DELTA_FP: 1, SPEEDUP: 2, FORWARDS: 1,
                                RATE: 3},
                   "notes": [LEGEND] + ([] if ("fp", "fp") in exact else
                                        ["no exact FP record: Δ FP vs exact cannot be computed"])}
    return table
