"""The study's findings, checked on the report's tables; each printed with its numbers and a verdict.

A finding is a set of checks, one per comparison the tables allow (a run against its FP record,
or two runs of one table at the same bits). Its verdict: "holds" when more than half of the
checks agree with it, "fails" otherwise, "not enough data" when the tables allow no check.
Only finished runs count. Comparisons of degradation (which drops more) use lossy runs only,
those whose avg drops by at least NEAR_LOSSLESS %: below that the ordering is noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pandas as pd

from qdlm_bench import decode_report
from qdlm_bench.study import AVG, DROP, relative_drop, variant_pairs

NEAR_LOSSLESS = 1.0  # % relative drop of avg
HOLDS, FAILS, NO_DATA = "holds", "fails", "not enough data"
ROTATION = ("quarot", "duquant")


@dataclass
class Finding:
    key: str
    claim: str
    checks: list[tuple[bool, str]] = field(default_factory=list)  # (agrees with the claim, its numbers)

    @property
    def verdict(self) -> str:
        if not self.checks:
            return NO_DATA
        return HOLDS if 2 * sum(ok for ok, _ in self.checks) > len(self.checks) else FAILS

    def to_markdown(self) -> str:
        agree = sum(ok for ok, _ in self.checks)
        head = f"- **{self.claim}**: {self.verdict}" + (f" ({agree} of {len(self.checks)} checks agree)"
                                                      if self.checks else "")
        return "\n".join([head] + [f"  - {'✓' if ok else '✗'} {text}" for ok, text in self.checks])


def _number(value) -> float | None:
    value = pd.to_numeric(value, errors="coerce")
    return None if pd.isna(value) else float(value)


def _runs(table: pd.DataFrame) -> Iterator[pd.Series]:
    """The finished quantized rows of a table."""
    for _, row in table.iterrows():
        if row["status"] == "done" and row["method"] != "fp":
            yield row


def _fp(table: pd.DataFrame) -> pd.Series | None:
    fp = table[(table["method"] == "fp") & (table["status"] == "done")]
    return fp.iloc[0] if len(fp) else None


def _name(table: pd.DataFrame, row: pd.Series) -> str:
    return f"{table.attrs['title']} {row['method']} {row['bits']}"


def _precision(table: pd.DataFrame, row: pd.Series) -> dict:
    """The row's bit fields (``store.precision``)."""
    return table.attrs["precision"][row["bits"]]


def near_lossless(tables, key: str, claim: str, at: Callable[[dict], bool]) -> Finding:
    """Runs whose precision satisfies ``at`` drop less than NEAR_LOSSLESS %."""
    found = Finding(key, claim)
    for table in tables:
        for row in _runs(table):
            drop = _number(row[DROP])
            if at(_precision(table, row)) and drop is not None:
                found.checks.append((drop < NEAR_LOSSLESS, f"{_name(table, row)}: drop {drop:.2f}%"))
    return found


def beats(tables, key: str, claim: str, winners: tuple[str, ...], loser: str,
          at: Callable[[dict], bool] = lambda precision: True) -> Finding:
    """Each of ``winners`` has a higher avg than ``loser`` in the same table at the same bits."""
    found = Finding(key, claim)
    for table in tables:
        runs = {(r["method"], r["bits"]): _number(r[AVG]) for r in _runs(table) if at(_precision(table, r))}
        for (method, bits), value in runs.items():
            other = runs.get((loser, bits))
            if method in winners and value is not None and other is not None:
                found.checks.append((value > other, f"{table.attrs['title']} {bits}: {method} avg {value:.2f} "
                                                    f"vs {loser} {other:.2f}"))
    return found


def _lossy(row: pd.Series) -> bool:
    drop = _number(row[DROP])
    return drop is not None and drop >= NEAR_LOSSLESS


def categories_drop_more(tables) -> Finding:
    """In lossy runs, Math and Code lose more (relative to FP) than QA."""
    found = Finding("math_code_drop_more", f"math and code drop more than QA (runs dropping >= {NEAR_LOSSLESS}%)")
    for table in tables:
        fp = _fp(table)
        if fp is None or "QA" not in table.attrs["categories"]:
            continue
        for row in filter(_lossy, _runs(table)):
            qa = relative_drop(row["QA"], fp["QA"])
            for cat in ("Math", "Code"):
                if cat in table.attrs["categories"]:
                    drop = relative_drop(row[cat], fp[cat])
                    if not (pd.isna(drop) or pd.isna(qa)):
                        found.checks.append((drop > qa, f"{_name(table, row)}: {cat} drop {drop:.2f}% "
                                                        f"vs QA {qa:.2f}%"))
    return found


def instruct_drops_less(tables) -> Finding:
    """The instruct variant of a model drops less than its base variant at the same method and bits."""
    found = Finding("instruct_drops_less",
                    f"instruct models drop less than base models (pairs where one drops >= {NEAR_LOSSLESS}%)")
    for base, instruct in variant_pairs(tables):
        drops = {(r["method"], r["bits"]): r for r in _runs(instruct)}
        for row in _runs(base):
            other = drops.get((row["method"], row["bits"]))
            if other is not None and (_lossy(row) or _lossy(other)):
                b, i = _number(row[DROP]), _number(other[DROP])
                found.checks.append((i < b, f"{base.attrs['stem']} {row['method']} {row['bits']}: "
                                            f"instruct drop {i:.2f}% vs base {b:.2f}%"))
    return found


DECODE_TOLERANCE = 1.0  # points of avg


def fast_decoding(fast_tables: list[pd.DataFrame]) -> list[Finding]:
    """On the Fast decoding tables (``decode_report``): prefix cache + parallel decoding keeps FP within
    DECODE_TOLERANCE points of exact decoding; a fast decoder costs a quantized model at most
    DECODE_TOLERANCE points more than it costs FP."""
    fp_ok = Finding("fast_decoding_fp_within_1pt",
                    f"prefix cache + parallel decoding keeps FP within {DECODE_TOLERANCE:g} point of exact decoding")
    same = Finding("fast_decoding_costs_quantized_as_fp",
                   f"a fast decoder costs a quantized model no more than {DECODE_TOLERANCE:g} point more than FP")
    for table in fast_tables:
        for _, row in table.iterrows():
            delta, delta_fp = _number(row[decode_report.DELTA]), _number(row[decode_report.DELTA_FP])
            if row["decode"] == "exact" or delta is None:
                continue
            name = f"{table.attrs['model']} {row['method']} {row['bits']} {row['decode']}"
            if row["method"] == "fp":
                if "prefix_cache" in row["decode"] and "parallel" in row["decode"]:
                    fp_ok.checks.append((delta >= -DECODE_TOLERANCE, f"{name}: Δ {delta:+.1f} pts"))
            elif delta_fp is not None:
                same.checks.append((delta >= delta_fp - DECODE_TOLERANCE,
                                    f"{name}: Δ {delta:+.1f} pts vs FP's {delta_fp:+.1f}"))
    return [fp_ok, same]


def check(tables: list[pd.DataFrame], fast_tables: list[pd.DataFrame] = ()) -> list[Finding]:
    """Every finding of the study, checked on report.study_tables(...) (and the Fast decoding
    tables, ``decode_report.fast_decoding_tables``)."""
    return [
        near_lossless(tables, "w4_weight_only_lossless", f"4-bit weight-only is near lossless (drop < {NEAR_LOSSLESS}%)",
                      lambda p: p["w_bits"] == 4 and p["a_bits"] == 16),
        near_lossless(tables, "w8a8_lossless", f"W8A8 is near lossless (drop < {NEAR_LOSSLESS}%)",
                      lambda p: p["w_bits"] == 8 and p["a_bits"] == 8),
        beats(tables, "rotation_beats_smoothquant", "at W4A4, rotation methods (QuaRot, DuQuant) beat SmoothQuant",
              ROTATION, "smoothquant", lambda p: p["w_bits"] == 4 and p["a_bits"] == 4),
        beats(tables, "gptq_beats_awq", "GPTQ beats AWQ at the same bits", ("gptq",), "awq"),
        categories_drop_more(tables),
        instruct_drops_less(tables),
        *(fast_decoding(list(fast_tables)) if len(fast_tables) else []),
    ]


def to_markdown(found: list[Finding]) -> str:
    return "\n".join(["## Findings", "", "verdict: holds when more than half of the checks agree", ""]
                     + [f.to_markdown() for f in found])
