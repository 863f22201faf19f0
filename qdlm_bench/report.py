"""Result records → pandas → study tables (markdown, LaTeX booktabs, CSV), findings and figures.

    python -m qdlm_bench.report [--store results] [--model X] [--method fp,rtn] [--bits w4a16g128]
                                [--sweep NAME] [--format md latex csv] [--out reports] [--wandb offline]

One table per model and baseline (the model, tasks, eval settings, dtype and seed an FP record
shares with its quantized runs; ``store.baseline_key``). Rows (bits, method): FP first, then
weight bits and activation bits descending. Columns: each task (% for fraction metrics, raw for
perplexity), the category averages QA / Math / Code (means of their task columns, see
CATEGORIES; lower-is-better tasks such as perplexity belong to none), avg (mean of the
higher-is-better tasks; of the perplexities when there is no other) and drop %.

Sign convention: drop % is the relative degradation of avg against the FP record of the same
baseline, so positive = worse: (fp - q) / fp for accuracy-like metrics, the relative increase
(q - fp) / fp for perplexity-like ones. An average is missing (—) when one of its tasks is.

Jobs per task (``shard=task``): where a model's records of one evaluation hold different task
lists, the records of each setting (the spec without its tasks) merge into one row: the latest
record (``created``) of each task fills its cells; a task of the table that no record of the
setting holds is "—", named under the table and in a "Missing" section (``merge_task_records``).
Where they all hold one task list (a store without per-task jobs), tables are as before.

The best value of each column among the finished quantized runs of one bit setting is bold.
Failed runs keep their row and error (a numerical fault as ``failed: <kind> at <layer>``). Record
files that cannot be read are skipped and listed after the report with their reasons. A (method, bits) that another table of the same tasks and
eval settings holds but this one lacks is a "missing" row, and so is an absent FP record. The
base and instruct variants of one model (names ending -base / -instruct) evaluated alike also
get a side-by-side table. A fast decoder (``decode``) has its own tables (a decode column, titles
"<model> decode=<decoder>") and the "Fast decoding" table (``qdlm_bench.decode_report``: accuracy
change and speed-up against exact decoding, quantized next to FP). The study's findings
(qdlm_bench.findings) close the report.

Written to --out ("-<sweep>" appended to names when --sweep is given): report.md (what is
printed), <table>.{md,tex,csv} for each table, <table>-drop.{png,pdf} (drop % per bits and
method). --wandb offline|online also logs them to a wandb run (job type "report").
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable, Iterable, Mapping

import pandas as pd

from qdlm_bench import decode_report, findings
from qdlm_bench.store import FP_PRECISION, CorruptRecordWarning, ResultStore, spec_key
from qdlm_bench.study import AVG, DROP, model_variant, relative_drop, variant_pairs
from qdlm_bench.tracking import MODES, WandbLogger

META = ("key", "baseline_key", "setting", "setting_text", "spec_tasks", "model", "method", "bits",
        "precision", "sweep", "status", "error", "fault", "created", "quant_setup", "spec", "missing_tasks",
        "decode")
STDERR, METRIC = ":stderr", ":metric"  # suffixes of a task's stderr / metric-name columns
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")
CATEGORIES = {
    "QA": ("arc*", "hellaswag*", "piqa*", "winogrande*", "mmlu*", "mini_qa*"),
    "Math": ("gsm8k*", "math*", "minerva*", "mini_math*"),
    "Code": ("humaneval*", "mbpp*", "mini_code*"),
}
LABELS = ("bits", "method", "decode", "status")
FP_LABEL = ("fp", "fp")  # (method, bits) of the baseline; "fp" ignores bits
MISSING_RUN = "missing"
NO_FP = "n/a (no FP record)"
MISSING = "—"
LEGEND = ("values: % for fraction metrics, raw for perplexity; QA/Math/Code: means of their tasks; "
          "drop % = relative degradation of avg vs the FP record of the same baseline (positive = worse; "
          "perplexity: relative increase)")
FORMATS = {"md": "md", "latex": "tex", "csv": "csv"}


def lower_is_better(metric: str | None) -> bool:
    return any(word in str(metric) for word in LOWER_IS_BETTER)


def category(task: str) -> str | None:
    """The category (QA, Math, Code) of a task name, None for any other task."""
    return next((cat for cat, patterns in CATEGORIES.items() if any(fnmatch(task, p) for p in patterns)), None)


def error_summary(error: str | None) -> str | None:
    """One line of an error: the first, or the exception line when the text is a traceback."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    if not lines:
        return None
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]


def failed_status(error, fault) -> str:
    """A failed run's status cell: its numerical fault (``failed: <kind> at <layer>``), else the
    one line of its error (80 characters at most), else just ``failed``."""
    if isinstance(fault, dict) and fault.get("kind"):
        return f"failed: {fault['kind']} at {fault.get('layer') or '?'}"
    return f"failed: {error[:80]}" if isinstance(error, str) else "failed"


def _setting(spec: dict) -> dict:
    """What runs of different models must share to be compared: tasks and eval settings
    (whether the chat template applies follows the model), dtype and seed."""
    evals = {k: v for k, v in (spec.get("eval") or {}).items() if k != "apply_chat_template"}
    return {"tasks": spec.get("tasks"), "eval": evals, "dtype": spec.get("dtype"), "seed": spec.get("seed")}


def _setting_text(setting: dict) -> str:
    evals = {k: v for k, v in setting["eval"].items() if v not in (None, {}, [])}
    return (f"tasks {', '.join(setting['tasks'] or [])}; eval {json.dumps(evals, sort_keys=True)}; "
            f"dtype {setting['dtype']}; seed {setting['seed']}")


def _flat(tree, prefix: str = "") -> dict[str, str]:
    """``{"calib.masking": "random", ...}``: the leaves of nested dicts (strings as they are, other
    values as JSON)."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree if isinstance(tree, str) else json.dumps(tree, sort_keys=True)}
    if not tree:
        return {prefix.rstrip("."): "{}"}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}


def _differences(setups: list[dict]) -> str:
    """``calib.masking: none | random`` for the leaves whose values differ between ``setups``."""
    keys = sorted({k for s in setups for k in s if len({s.get(k) for s in setups}) > 1})
    return "; ".join(f"{k}: {' | '.join(s.get(k, '—') for s in setups)}" for k in keys) or "no difference"


def runtime_points(records: Iterable[dict]) -> dict[str, list[dict]]:
    """{model: points of ``plots.accuracy_memory_speed``}: the finished records that carry runtime
    measurements (``record["runtime"]``: weight bytes, forward latency), accuracy the mean of their
    higher-is-better task scores; the latest record of each (method, bits, runtime) wins."""
    found: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: str(r.get("created"))):
        rt = record.get("runtime") or {}
        scores = [m.get("value") for m in (record.get("metrics") or {}).values()
                  if isinstance(m.get("value"), (int, float)) and not lower_is_better(m.get("metric"))]
        if record.get("status") != "done" or "linear_weight_bytes" not in rt or not scores:
            continue
        runtime = "fp" if record.get("method") == "fp" else rt.get("runtime", "fake")
        if runtime == "real" and not rt.get("format"):
            runtime = "fake"  # a setting without a kernel (W4A4/W4A8) ran fake
        label = "fp" if runtime == "fp" else f"{record.get('method')} {record.get('bits')}" + (
            f" {rt['format']}" if runtime == "real" else "")
        found.setdefault(record.get("model"), {})[(label, runtime)] = {
            "label": label, "runtime": runtime, "accuracy": sum(scores) / len(scores),
            "weight_gib": rt["linear_weight_bytes"] / 2**30, "forward_ms": rt.get("forward_ms")}
    return {model: list(points.values()) for model, points in found.items()}


def runtime_figures(records: list[dict], out: Path, suffix: str = "") -> list[Path]:
    """One accuracy-memory-speed figure per model (``<model>-runtime``), for records with runtime data."""
    from qdlm_bench import plots

    return [p for model, points in runtime_points(records).items()
            for p in plots.accuracy_memory_speed(points, out / f"{slug(str(model))}{suffix}-runtime",
                                                 title=f"{model}: accuracy vs weight memory vs forward latency")]


def records_frame(records: Iterable[dict]) -> pd.DataFrame:
    """One row per record: META columns, then per task `<task>` (primary metric value),
    `<task>:stderr` and `<task>:metric` (the metric's name). FP records get bits "fp"."""
    rows = []
    for record in records:
        row = {field: record.get(field) for field in META}
        setting = _setting(record.get("spec") or {})
        row.update(setting=spec_key(setting), setting_text=_setting_text(setting),
                   spec_tasks=tuple(setting["tasks"] or ()), error=error_summary(record.get("error")),
                   spec=record.get("spec") or {}, missing_tasks=(),
                   quant_setup=_flat({k: (record.get("spec") or {}).get(k) for k in ("method", "calib", "quant")}))
        row["decode"] = decode_report.decode_label(record)
        if row["method"] == "fp":
            row["bits"] = "fp"
        elif (record.get("spec") or {}).get("runtime") == "real":  # its own row, next to the fake run
            row["method"] = f"{row['method']}+real"
        for task, result in (record.get("metrics") or {}).items():
            row[task], row[task + STDERR] = result.get("value"), result.get("stderr")
            row[task + METRIC] = result.get("metric")
        rows.append(row)
    frame = pd.DataFrame(rows, columns=None if rows else list(META))
    for task in task_columns(frame):
        for col in (task, task + STDERR):
            frame[col] = pd.to_numeric(frame[col], errors="coerce")  # lm-eval writes "N/A" stderr
    return frame


def _without_tasks(spec: dict) -> dict:
    """``spec`` without what names its tasks (``tasks``, ``eval.task_hashes``)."""
    evals = {k: v for k, v in (spec.get("eval") or {}).items() if k != "task_hashes"}
    return {**{k: v for k, v in spec.items() if k != "tasks"}, "eval": evals}


def merge_task_records(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per setting where a model's records of one evaluation hold different task lists
    (``shard=task``: a record per task). Records are grouped by model and evaluation without tasks;
    a group whose records all hold one task list is left as it is. Otherwise each setting (the spec
    without its tasks) becomes one row: per task, the latest record (``created``) holding it gives
    its value, stderr and metric (and a failed status with its error); ``spec_tasks`` is the
    group's union of tasks and ``missing_tasks`` those no record of the setting holds, in order."""
    if frame.empty:
        return frame
    plain = frame["spec"].map(_without_tasks)
    groups = plain.map(lambda s: spec_key({k: s.get(k) for k in ("model", "eval", "dtype", "seed")}))
    parts = []
    for group_key, group in frame.groupby(groups, sort=False):
        if group["spec_tasks"].nunique() <= 1:
            parts.append(group)
            continue
        tasks = list(dict.fromkeys(t for ts in group["spec_tasks"] for t in ts))
        order = group["created"].astype(str).sort_values(kind="stable").index
        for _, same in group.loc[order].groupby(plain.loc[order].map(spec_key), sort=False):
            parts.append(_merged_row(same, tasks, group_key))
    return pd.concat(parts, ignore_index=True)


def _merged_row(records: pd.DataFrame, tasks: list[str], group_key: str) -> pd.DataFrame:
    """``merge_task_records``'s row of one setting's records (oldest first)."""
    row = records.iloc[-1].copy()
    latest = {t: records[records["spec_tasks"].map(lambda ts: t in ts)] for t in tasks}
    latest = {t: holders.iloc[-1] for t, holders in latest.items() if len(holders)}
    for t in tasks:
        for col in (t, t + STDERR, t + METRIC):
            row[col] = latest[t].get(col) if t in latest else math.nan
    failed = [r for r in latest.values() if r["status"] == "failed"]
    if failed:
        row["status"], row["error"], row["fault"] = "failed", failed[-1]["error"], failed[-1]["fault"]
    setting = _setting(_without_tasks(row["spec"])) | {"tasks": tasks}
    row["setting"], row["setting_text"] = spec_key(setting), _setting_text(setting)
    row["baseline_key"], row["spec_tasks"] = group_key, tuple(tasks)
    row["missing_tasks"] = tuple(t for t in tasks if t not in latest)
    return row.to_frame().T


def task_columns(frame: pd.DataFrame) -> list[str]:
    """The value column of each task, in first-seen order."""
    return [c for c in frame.columns if c not in META and not c.endswith((STDERR, METRIC))]


def _bits_order(method: str, bits: str | None, precision: dict) -> tuple:
    """FP first, then weight bits descending, then activation bits descending (``precision``: the
    record's, see ``store.precision``)."""
    return (method != "fp", -precision["w_bits"], -precision["a_bits"], str(bits), method)


def _tasks(rows: pd.DataFrame) -> dict[str, str | None]:
    """{task: its metric name} of a table's tasks (its specs' and any reported), ordered QA, Math,
    Code, others, then lower-is-better tasks."""
    spec_tasks = [t for ts in rows["spec_tasks"].dropna() for t in ts]
    tasks = dict.fromkeys(spec_tasks + [t for t in task_columns(rows) if rows[t].notna().any()])
    metrics = {t: next(iter(rows[t + METRIC].dropna()), None) if t + METRIC in rows else None for t in tasks}
    rank = {cat: i for i, cat in enumerate(CATEGORIES)}
    order = sorted(tasks, key=lambda t: (lower_is_better(metrics[t]), rank.get(category(t), len(rank))))
    return {t: metrics[t] for t in order}


def _best_cells(table: pd.DataFrame, columns: list[str], lower: set[str]) -> set[tuple[int, str]]:
    """(row, column) of the best value of each column among the finished quantized rows of
    each bit setting that has at least two of them."""
    done = table[(table["status"] == "done") & (table["method"] != "fp")]
    best = set()
    for _, group in done.groupby("bits"):
        for col in columns:
            values = pd.to_numeric(group[col], errors="coerce").dropna()
            if len(values) >= 2:
                top = values.min() if col in lower else values.max()
                best |= {(i, col) for i in values.index[values == top]}
    return best


def study_table(rows: pd.DataFrame, expected: Mapping[tuple[str, str], dict] | None = None) -> pd.DataFrame:
    """The study table of one model and baseline from its records (rows of records_frame).

    ``expected`` ({(method, bits): precision}) labels that no record has become "missing" rows; so
    does the FP record when absent. attrs: "model", "variant", "stem", "setting", "key" (baseline
    key), "notes" (lines to print under the table), "metrics" ({task: metric name}), "decimals"
    ({column: decimals}), "lower" (lower-is-better columns), "best" ({(row, column)}),
    "categories" ({category: its tasks}), "precision" ({bits: the records' precision})."""
    if rows.empty:
        raise ValueError("no records to tabulate")
    if rows["model"].nunique() != 1 or rows["baseline_key"].nunique() != 1:
        raise ValueError(f"a study table holds one model and baseline, got models {sorted(rows['model'].unique())} "
                         f"and {rows['baseline_key'].nunique()} baselines")
    first = rows.iloc[0]
    expected = {FP_LABEL: FP_PRECISION, **(expected or {})}
    absent = sorted(set(expected) - set(zip(rows["method"], rows["bits"])))
    placeholders = pd.DataFrame({"method": [m for m, _ in absent], "bits": [b for _, b in absent],
                                 "precision": [expected[label] for label in absent],
                                 "status": MISSING_RUN, "created": ""})
    rows = pd.concat([rows, placeholders], ignore_index=True) if absent else rows
    order = sorted(range(len(rows)), key=lambda i: (_bits_order(rows["method"].iat[i], rows["bits"].iat[i],
                                                                rows["precision"].iat[i]),
                                                    str(rows["created"].iat[i])))
    rows = rows.iloc[order].reset_index(drop=True)

    metrics = _tasks(rows)
    tasks = list(metrics)
    for t in tasks:
        rows[t] = rows[t] if t in rows else math.nan
    lower = {t: lower_is_better(metrics[t]) for t in tasks}
    percent = {t: not lower[t] and rows[t].notna().any() and rows[t].dropna().between(0, 1).all() for t in tasks}

    table = rows[["bits", "method"]].copy()
    decode = first.get("decode", "exact")
    if decode != "exact":  # a fast decoder's table (its own baseline: the FP run with that decoder)
        table["decode"] = decode
    table["status"] = [failed_status(e, f) if s == "failed" else s
                       for s, e, f in zip(rows["status"], rows["error"], rows.get("fault", [None] * len(rows)))]
    for t in tasks:
        table[t] = rows[t] * (100 if percent[t] else 1)
    categories = {cat: [t for t in tasks if not lower[t] and category(t) == cat] for cat in CATEGORIES}
    categories = {cat: ts for cat, ts in categories.items() if ts}
    for cat, cat_tasks in categories.items():
        table[cat] = table[cat_tasks].mean(axis=1, skipna=False)
    avg_tasks = [t for t in tasks if not lower[t]] or tasks
    avg_lower = all(lower[t] for t in avg_tasks)
    table[AVG] = table[avg_tasks].mean(axis=1, skipna=False) if avg_tasks else math.nan

    fp = table[(table["method"] == "fp") & (table["status"] == "done")]
    table[DROP] = ([relative_drop(a, fp[AVG].iat[0], avg_lower) for a in table[AVG]] if len(fp)
                   else NO_FP)

    stem, variant = model_variant(first["model"])
    lower_cols = {t for t in tasks if lower[t]} | ({AVG} if avg_lower else set()) | {DROP}
    best = _best_cells(table, [*tasks, *categories, AVG, DROP], lower_cols)
    notes = [LEGEND + ("; bold = best of a bit setting" if best else ""), f"baseline: {first['setting_text']}"]
    if excluded := [t for t in tasks if t not in avg_tasks]:
        notes.append(f"avg and categories exclude lower-is-better tasks: {', '.join(excluded)}")
    if other := [t for t in avg_tasks if not any(t in ts for ts in categories.values())]:
        notes.append(f"in avg but in no category: {', '.join(other)}")
    if not len(fp):
        notes.append("no finished FP record (method 'fp') for this baseline: drops cannot be computed")
    labels = [f"{m} {b}" for m, b in zip(table["method"], table["bits"])]
    for status, what in ((MISSING_RUN, "missing runs (no record)"), ("failed", "failed runs")):
        if hit := [lbl for lbl, s in zip(labels, rows["status"]) if s == status]:
            notes.append(f"{what}: {'; '.join(hit)}")
    missing = {lbl: list(ts) for lbl, ts in zip(labels, rows.get("missing_tasks", [()] * len(rows)))
               if isinstance(ts, tuple) and ts}
    if missing:
        notes.append("missing tasks (no record; the latest record of each task fills a row): "
                     + "; ".join(f"{lbl}: {', '.join(ts)}" for lbl, ts in missing.items()))
    for label in [lbl for lbl, n in Counter(labels).items() if n > 1]:
        setups = [rows["quant_setup"].iat[i] for i, lbl in enumerate(labels) if lbl == label]
        notes.append(f"several records for {label}, in row order: {_differences(setups)}")
    table.attrs = {
        "model": first["model"], "title": first["model"], "name": slug(first["model"]), "stem": stem,
        "variant": variant, "setting": first["setting"], "key": first["baseline_key"], "notes": notes,
        "metrics": metrics, "lower": lower_cols, "categories": categories,
        "decimals": {**{t: 1 if percent[t] else 2 for t in tasks},
                     **{c: 1 if all(percent[t] for t in ts) else 2 for c, ts in categories.items()},
                     AVG: 1 if all(percent[t] for t in avg_tasks) else 2, DROP: 1},
        "best": best, "precision": dict(zip(rows["bits"], rows["precision"])), "missing": missing,
        "decode": decode,
    }
    return table


def _name_tables(tables: list[pd.DataFrame], names: list[str]) -> list[pd.DataFrame]:
    """Set attrs "name" (a file stem) and "title", with the table's key when a name repeats."""
    counts = Counter(names)
    for table, name in zip(tables, names):
        unique = name if counts[name] == 1 else f"{name}-{table.attrs['key'][:8]}"
        table.attrs.update(name=slug(unique), title=unique)
    return tables


def study_tables(frame: pd.DataFrame) -> list[pd.DataFrame]:
    """The study table of every model and baseline in ``frame`` (by model name, then age). Each
    table's rows are the (method, bits) of every table of the same setting: absent = missing."""
    frame = merge_task_records(frame[frame["model"].notna()])
    expected: dict[str, dict] = {}
    for setting, method, bits, precision in zip(frame["setting"], frame["method"], frame["bits"],
                                                frame["precision"]):
        expected.setdefault(setting, {})[(method, bits)] = precision
    groups = sorted(frame.groupby(["model", "baseline_key"], sort=False),
                    key=lambda g: (g[0][0], str(g[1]["created"].min())))
    tables = [study_table(rows.reset_index(drop=True), expected[rows["setting"].iat[0]]) for _, rows in groups]
    if any(t.attrs["decode"] != "exact" for t in tables):  # a fast decoder in the report: every table names its decoder
        for t in tables:
            if "decode" not in t:
                t.insert(2, "decode", t.attrs["decode"])
    return _name_tables(tables, [t.attrs["model"] + ("" if t.attrs["decode"] == "exact" else f" decode={t.attrs['decode']}")
                                 for t in tables])


def side_by_side(base: pd.DataFrame, instruct: pd.DataFrame) -> pd.DataFrame:
    """Base and instruct tables merged on (bits, method): per variant its category averages, avg
    and drop % (and status, unless every run of the variant finished)."""
    keyed = []
    for variant, table in (("base", base), ("instruct", instruct)):
        cols = [*table.attrs["categories"], AVG, DROP]
        if (table["status"] != "done").any():
            cols.insert(0, "status")
        part = table[["bits", "method", *cols]].rename(columns={c: f"{c} ({variant})" for c in cols})
        part["nth"] = part.groupby(["bits", "method"]).cumcount()
        keyed.append(part)
    merged = keyed[0].merge(keyed[1], on=["bits", "method", "nth"], how="outer")
    precision = {**base.attrs["precision"], **instruct.attrs["precision"]}
    merged = merged.iloc[sorted(range(len(merged)), key=lambda i: _bits_order(
        merged["method"].iat[i], merged["bits"].iat[i], precision[merged["bits"].iat[i]]))]
    merged = merged.drop(columns="nth").reset_index(drop=True)
    decimals = {f"{c} ({v})": d for v, t in (("base", base), ("instruct", instruct))
                for c, d in t.attrs["decimals"].items()}
    title = f"{base.attrs['stem']}-base-vs-instruct"
    merged.attrs = {"stem": base.attrs["stem"], "key": base.attrs["setting"], "decimals": decimals,
                    "title": title, "name": slug(title),
                    "notes": [LEGEND, f"base: {base.attrs['model']}, instruct: {instruct.attrs['model']}; "
                                      "per-task values in their own tables"]}
    return merged


def side_by_side_tables(tables: list[pd.DataFrame]) -> list[pd.DataFrame]:
    pairs = [side_by_side(b, i) for b, i in variant_pairs(tables)]
    return _name_tables(pairs, [t.attrs["title"] for t in pairs])


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


def _cells(table: pd.DataFrame, escape: Callable[[str], str], bold: Callable[[str], str]) -> pd.DataFrame:
    cells = format_table(table).map(escape)
    for i, col in table.attrs.get("best", ()):
        cells.at[i, col] = bold(cells.at[i, col])
    return cells


def to_markdown(table: pd.DataFrame) -> str:
    cells = _cells(table, lambda s: s.replace("|", r"\|"), lambda s: f"**{s}**")
    align = ["left" if c in LABELS or c.startswith("status") else "right" for c in cells.columns]
    text = cells.to_markdown(index=False, colalign=align, disable_numparse=True)
    return "\n".join([text, ""] + [f"- {note}" for note in table.attrs.get("notes", [])])


_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
          "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "|": r"\textbar{}",
          "<": r"\textless{}", ">": r"\textgreater{}", MISSING: "--"}


def latex_escape(text: str) -> str:
    return re.sub("|".join(map(re.escape, _LATEX)), lambda m: _LATEX[m.group()], str(text))


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); title and notes become comment lines."""
    cells = _cells(table, latex_escape, lambda s: rf"\textbf{{{s}}}")
    align = "".join("l" if c in LABELS or c.startswith("status") else "r" for c in cells.columns)
    def line(values): return " & ".join(values) + r" \\"
    comments = [table.attrs.get("title", ""), *table.attrs.get("notes", [])]
    return "\n".join([f"% {latex_escape(n)}" for n in comments if n]
                     + [rf"\begin{{tabular}}{{{align}}}", r"\toprule", line(map(latex_escape, cells.columns)),
                        r"\midrule"]
                     + [line(row) for row in cells.itertuples(index=False)]
                     + [r"\bottomrule", r"\end{tabular}", ""])


def slug(text: str) -> str:
    """``text`` safe as a file name."""
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


def render(tables: list[pd.DataFrame], found: list) -> str:
    """The whole report as markdown: every table under its title, then the findings."""
    parts = [f"## {t.attrs['title']}\n\n{to_markdown(t)}\n" for t in tables]
    return "\n".join(parts + missing_section(tables) + [findings.to_markdown(found)])


def missing_section(tables: list[pd.DataFrame]) -> list[str]:
    """The "Missing" section: per table, each setting's tasks that no record holds yet (none: [])."""
    lines = [f"- {t.attrs['title']} | {label}: {', '.join(tasks)}"
             for t in tables for label, tasks in t.attrs.get("missing", {}).items()]
    if not lines:
        return []
    return [f"## Missing\n\nTasks without a record (the table shows {MISSING}):\n\n" + "\n".join(lines) + "\n"]


def make_report(records: list[dict], out: Path, formats: Iterable[str] = tuple(FORMATS), suffix: str = "",
                logger: WandbLogger | None = None) -> list[Path]:
    """Print the report of ``records`` and write it to ``out``; log it to wandb through
    ``logger`` when given. Returns the files written."""
    from qdlm_bench import plots  # it imports matplotlib

    tables = study_tables(records_frame(records))
    pairs = side_by_side_tables(tables)
    fast = decode_report.fast_decoding_tables(records)
    found = findings.check(tables, fast)
    text = render(tables + pairs + fast, found)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"report{suffix}.md"]
    written[0].write_text(text + "\n")
    for table in tables + pairs + fast:
        for fmt in formats:
            written.append(out / f"{table.attrs['name']}{suffix}.{FORMATS[fmt]}")
            _write(table, fmt, written[-1])
    figures = [p for t in tables for p in plots.drop_chart(t, out / f"{t.attrs['name']}{suffix}-drop")]
    figures += runtime_figures(records, out, suffix)
    print(f"wrote {len(written) + len(figures)} files to {out}", file=sys.stderr)
    if logger is not None:
        logger.log_outputs(f"report{suffix}", "report", files=written + figures,
                           tables={t.attrs["name"]: format_table(t) for t in tables + pairs + fast},
                           images=[p for p in figures if p.suffix == ".png"],
                           summary={f"finding/{f.key}": f.verdict for f in found})
    return written + figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qdlm_bench.report", description=__doc__.split("\n")[0])
    parser.add_argument("--store", type=Path, default=Path("results"), help="folder of result records")
    for name in ("model", "method", "bits", "sweep"):
        parser.add_argument(f"--{name}", nargs="+", action="extend", help="filter; comma-separated ok")
    parser.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS),
                        help="formats of the per-table files (default: all)")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="folder the report is written to")
    parser.add_argument("--wandb", choices=MODES, default="disabled",
                        help="also log tables, figures and findings to a wandb run (project qdlm-bench, "
                             "dir ./wandb; group: the sweep when one is given)")
    args = parser.parse_args(argv)
    where = {name: [v for arg in getattr(args, name) for v in arg.split(",") if v]
             if getattr(args, name) else None for name in ("model", "method", "bits", "sweep")}
    if not args.store.is_dir():
        parser.error(f"result store {args.store} does not exist")
    store = ResultStore(args.store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptRecordWarning)  # listed below, path and reason
        records = with_baselines(store.records(**where), store)
    if records:
        sweep = "+".join(where["sweep"]) if where["sweep"] else None
        logger = WandbLogger(mode=args.wandb, dir="wandb", group=sweep)
        make_report(records, args.out, args.format, f"-{slug(sweep)}" if sweep else "", logger)
    else:
        print(f"no records in {args.store} match {where}", file=sys.stderr)
    if store.skipped:
        print(skipped_text(store.skipped))
    return 0 if records else 1


def skipped_text(skipped: Mapping[Path, str]) -> str:
    """The unreadable record files a report skipped, one line each with the reason and the fix."""
    lines = [f"- {path}: {reason}" for path, reason in sorted(skipped.items())]
    return "\n".join([f"## Unreadable records ({len(lines)}, skipped)", "", *lines, "",
                      "Delete each file, or rerun its configuration with force=true to replace it."])


if __name__ == "__main__":
    sys.exit(main())
