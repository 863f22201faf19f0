"""Result records → pandas → study tables in markdown, LaTeX (booktabs) and CSV.

    python -m qdlm_bench.report [--store results] [--model X] [--method fp,rtn] [--bits w4a16g128]
                                [--sweep NAME] [--format md|latex|csv] [--out reports/]

Sign convention: "drop %" is the relative degradation of a row's avg against the FP record
(method "fp") with the same baseline_key, so positive = worse. For accuracy-like metrics (higher
is better) drop = (fp - q) / fp; for perplexity-like metrics (lower is better) it is the relative
increase, (q - fp) / fp. Fractions are shown as percentages; perplexities raw.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Iterable

import pandas as pd

from qdlm_bench.store import ResultStore

META = ("key", "baseline_key", "model", "method", "bits", "sweep", "status", "error", "created")
STDERR, METRIC = ":stderr", ":metric"  # suffixes of a task's stderr / metric-name columns
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")
LABELS = ("bits", "method", "status")
AVG, DROP = "avg", "drop %"
NO_FP = "n/a (no FP record)"
MISSING = "—"
LEGEND = ("values: % for fraction metrics, raw for perplexity; drop % = relative degradation of "
          "avg vs the FP record of the same baseline (positive = worse; perplexity: relative increase)")
FORMATS = {"md": "md", "latex": "tex", "csv": "csv"}


def lower_is_better(metric: str | None) -> bool:
    return any(word in str(metric) for word in LOWER_IS_BETTER)


def error_summary(error: str | None) -> str | None:
    """One line of an error: the first, or the exception line when the text is a traceback."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    if not lines:
        return None
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def records_frame(records: Iterable[dict]) -> pd.DataFrame:
    """One row per record: META columns, then per task `<task>` (primary metric value),
    `<task>:stderr` and `<task>:metric` (the metric's name)."""
    rows = []
    for record in records:
        row = {field: record.get(field) for field in META}
        row["error"] = error_summary(record.get("error"))
        for task, result in (record.get("metrics") or {}).items():
            row[task], row[task + STDERR] = result.get("value"), result.get("stderr")
            row[task + METRIC] = result.get("metric")
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else list(META))
    for task in task_columns(frame):
        for col in (task, task + STDERR):
            frame[col] = pd.to_numeric(frame[col], errors="coerce")  # lm-eval writes "N/A" stderr
    return frame


def task_columns(frame: pd.DataFrame) -> list[str]:
    """The value column of each task, in first-seen order."""
    return [c for c in frame.columns if c not in META and not c.endswith((STDERR, METRIC))]


def _bits_order(method: str, bits: str | None) -> tuple:
    """FP first, then weight bits descending, then activation bits descending."""
    fields = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", str(bits).lower())}
    return (method != "fp", -fields.get("w", -math.inf), -fields.get("a", math.inf), str(bits), method)


def _relative_drop(value: float, fp: float, lower: bool) -> float:
    if pd.isna(value) or pd.isna(fp) or fp == 0:
        return math.nan
    return 100 * ((value - fp) if lower else (fp - value)) / fp


def study_table(frame: pd.DataFrame, model: str) -> pd.DataFrame:
    """The study table of `model`: one row per record, sorted FP first then by bits descending;
    columns bits, method, status, one per task (percent for fractions), avg, drop %.

    avg is the mean over the higher-is-better tasks (over the perplexity tasks when there are no
    others); it is NaN when one of them is missing, so averages always cover the same tasks.
    attrs: "notes" (lines to print under the table), "metrics" ({task: metric name}),
    "decimals" ({column: decimals to show})."""
    rows = frame[frame["model"] == model]
    if rows.empty:
        raise ValueError(f"no records for model {model!r}")
    order = sorted(range(len(rows)), key=lambda i: _bits_order(rows["method"].iat[i], rows["bits"].iat[i]))
    rows = rows.iloc[order].reset_index(drop=True)
    tasks = [t for t in task_columns(rows) if rows[t].notna().any()]
    metrics = {t: rows[t + METRIC].dropna().iat[0] for t in tasks}
    lower = {t: lower_is_better(metrics[t]) for t in tasks}
    percent = {t: not lower[t] and rows[t].dropna().between(0, 1).all() for t in tasks}

    table = rows[["bits", "method"]].copy()
    table["status"] = [f"failed: {e[:80]}" if s == "failed" and isinstance(e, str) else s
                       for s, e in zip(rows["status"], rows["error"])]
    for t in tasks:
        table[t] = rows[t] * (100 if percent[t] else 1)
    avg_tasks = [t for t in tasks if not lower[t]] or tasks
    avg_lower = all(lower[t] for t in avg_tasks)
    table[AVG] = table[avg_tasks].mean(axis=1, skipna=False)

    fp = rows[(rows["method"] == "fp") & (rows["status"] == "done")].sort_values("created", kind="stable")
    fp_avg = pd.Series(table.loc[fp.index, AVG].to_numpy(), index=fp["baseline_key"])
    fp_avg = fp_avg[~fp_avg.index.duplicated(keep="last")]  # the newest FP record of a baseline
    table[DROP] = [_relative_drop(a, fp_avg[b], avg_lower) if b in fp_avg.index else NO_FP
                   for a, b in zip(table[AVG], rows["baseline_key"])]

    notes = [LEGEND]
    if excluded := [t for t in tasks if t not in avg_tasks]:
        notes.append(f"avg excludes lower-is-better tasks: {', '.join(excluded)}")
    if no_fp := [" ".join(x for x in (m, b) if isinstance(x, str))
                 for m, b, d in zip(table["method"], table["bits"], table[DROP]) if d == NO_FP]:
        notes.append(f"no finished FP record (method 'fp') for the baseline of: {'; '.join(no_fp)}")
    table.attrs = {
        "model": model, "notes": notes, "metrics": metrics,
        "decimals": {**{t: 1 if percent[t] else 2 for t in tasks},
                     AVG: 1 if all(percent[t] for t in avg_tasks) else 2, DROP: 1},
    }
    return table


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as strings: numbers rounded per attrs["decimals"], missing values as "—"."""
    decimals = table.attrs.get("decimals", {})

    def cell(value, col):
        if isinstance(value, str):
            return value
        if value is None or pd.isna(value):
            return MISSING
        return f"{value:.{decimals[col]}f}" if col in decimals else str(value)

    return pd.DataFrame({c: [cell(v, c) for v in table[c]] for c in table.columns})


def to_markdown(table: pd.DataFrame) -> str:
    cells = format_table(table).map(lambda s: s.replace("|", r"\|"))
    align = ["left" if c in LABELS else "right" for c in cells.columns]
    text = cells.to_markdown(index=False, colalign=align, disable_numparse=True)
    return "\n".join([text, ""] + [f"- {note}" for note in table.attrs.get("notes", [])])


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "|": r"\textbar{}",
          "<": r"\textless{}", ">": r"\textgreater{}", MISSING: "--"}


def latex_escape(text: str) -> str:
    return re.sub("|".join(map(re.escape, _LATEX)), lambda m: _LATEX[m.group()], str(text))


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); notes become comment lines above it."""
    cells = format_table(table)
    align = "".join("l" if c in LABELS else "r" for c in cells.columns)
    def line(values): return " & ".join(latex_escape(v) for v in values) + r" \\"
    return "\n".join([f"% {latex_escape(n)}" for n in table.attrs.get("notes", [])]
                     + [rf"\begin{{tabular}}{{{align}}}", r"\toprule", line(cells.columns), r"\midrule"]
                     + [line(row) for row in cells.itertuples(index=False)]
                     + [r"\bottomrule", r"\end{tabular}", ""])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _write(table: pd.DataFrame, fmt: str, path: Path) -> None:
    if fmt == "csv":
        table.to_csv(path, index=False)
    else:
        path.write_text(to_latex(table) if fmt == "latex" else to_markdown(table) + "\n")


def with_baselines(records: list[dict], store: ResultStore) -> list[dict]:
    """``records`` plus the FP records they compare against (a sweep reuses an earlier FP run)."""
    keys = {r["key"] for r in records}
    wanted = {r["baseline_key"] for r in records}
    return records + [r for r in store.records(method="fp")
                      if r["baseline_key"] in wanted and r["key"] not in keys]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qdlm_bench.report", description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=Path("results"), help="folder of result records")
    for name in ("model", "method", "bits", "sweep"):
        parser.add_argument(f"--{name}", nargs="+", action="extend", help="filter; comma-separated ok")
    parser.add_argument("--format", choices=FORMATS, default="md", help="format of the files in --out")
    parser.add_argument("--out", type=Path, help="folder to write one table file per model into")
    args = parser.parse_args(argv)
    where = {name: [v for arg in getattr(args, name) for v in arg.split(",") if v]
             if getattr(args, name) else None for name in ("model", "method", "bits", "sweep")}
    if not args.store.is_dir():
        parser.error(f"result store {args.store} does not exist")
    store = ResultStore(args.store)
    records = with_baselines(store.records(**where), store)
    if not records:
        print(f"no records in {args.store} match {where}", file=sys.stderr)
        return 1
    frame = records_frame(records)
    suffix = f"-{_slug('+'.join(where['sweep']))}" if where["sweep"] else ""
    for model in sorted(frame["model"].dropna().unique()):
        table = study_table(frame, model)
        print(f"## {model}\n\n{to_markdown(table)}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"{_slug(model)}{suffix}.{FORMATS[args.format]}"
            _write(table, args.format, path)
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
