import re
import shutil
import subprocess

import pandas as pd
import pytest

from qdlm_bench import report
from qdlm_bench.store import ResultStore, new_record

ERROR = "Traceback (most recent call last):\n  File \"run.py\", line 1\nRuntimeError: out of memory"
TASKS = ("arc_easy", "gsm8k")


def make_record(model, method, bits, values, metric="acc,none", status="done", error=None, tasks=TASKS,
                chat=False, **eval_cfg):
    spec = {"model": {"name": model}, "method": {"name": method}, "quant": {"bits": bits},
            "tasks": list(tasks), "eval": {"gen_length": 32, "apply_chat_template": chat, **eval_cfg},
            "calib": {}, "dtype": "bfloat16", "seed": 0}
    metrics = {task: {"metric": metric if isinstance(metric, str) else metric[task], "value": v,
                      "stderr": 0.01, "all": {}} for task, v in values.items()}
    return new_record(spec, metrics=metrics, status=status, error=error, sweep="s1")


def study_records():
    return [
        make_record("m1", "rtn", "w4a4", {"arc_easy": 0.30, "gsm8k": 0.10}),
        make_record("m1", "rtn", "w4a16g128", {"arc_easy": 0.60, "gsm8k": 0.40}),
        make_record("m1", "gptq", "w4a16g128", {}, status="failed", error=ERROR),
        make_record("m1", "fp", None, {"arc_easy": 0.80, "gsm8k": 0.60}),
        make_record("m1", "rtn", "w8a8", {"arc_easy": 0.70, "gsm8k": 0.60}),
        make_record("m1", "rtn", "w3a16", {"arc_easy": 0.50}),  # a task missing
        make_record("m1", "rtn", "w8a8", {"arc_easy": 0.1, "gsm8k": 0.1}, gen_length=64),  # no FP
        make_record("m2", "rtn", "w4a16", {"arc_easy": 0.5, "gsm8k": 0.5}),  # same setting as m1, no FP
    ]


def tables_of(records):
    return {t.attrs["title"]: t for t in report.study_tables(report.records_frame(records))}


@pytest.fixture
def tables():
    return tables_of(study_records())


def m1_table(tables):
    """The table of m1 evaluated at gen_length 32 (the one with its FP record)."""
    [table] = [t for title, t in tables.items() if title.startswith("m1") and "fp" in set(t["method"])
               and (t["method"] == "gptq").any()]
    return table


def labels(table):
    return list(zip(table["method"], table["bits"]))


def row(table, method, bits, nth=0):
    return table.iloc[[i for i, label in enumerate(labels(table)) if label == (method, bits)][nth]]


def test_records_frame_columns():
    frame = report.records_frame(study_records())
    assert len(frame) == 8
    assert report.task_columns(frame) == ["arc_easy", "gsm8k"]
    assert frame.loc[1, "gsm8k"] == 0.40 and frame.loc[1, "gsm8k:stderr"] == 0.01
    assert frame.loc[1, "gsm8k:metric"] == "acc,none"
    assert frame.loc[2, "error"] == "RuntimeError: out of memory"
    assert frame.loc[3, "bits"] == "fp"  # the baseline ignores bits
    settings = list(frame["setting"])  # tasks + eval (minus the chat template), whatever the model
    assert settings[0] == settings[7] != settings[6]
    assert list(report.records_frame([]).columns) == list(report.META)


def test_one_table_per_model_and_baseline(tables):
    assert len(tables) == 3 and {t.attrs["model"] for t in tables.values()} == {"m1", "m2"}
    assert len([title for title in tables if title.startswith("m1-")]) == 2  # titles carry the key
    with pytest.raises(ValueError, match="one model and baseline"):
        report.study_table(report.records_frame(study_records()))


def test_rows_sorted_fp_first_then_bits_descending(tables):
    table = m1_table(tables)
    assert labels(table) == [
        ("fp", "fp"), ("rtn", "w8a8"), ("rtn", "w4a16"), ("gptq", "w4a16g128"), ("rtn", "w4a16g128"),
        ("rtn", "w4a4"), ("rtn", "w3a16")]
    assert list(table.columns) == ["bits", "method", "status", "arc_easy", "gsm8k", "QA", "Math", "avg", "drop %"]


def test_averages_and_drops(tables):
    table = m1_table(tables)
    fp, w8, w4 = row(table, "fp", "fp"), row(table, "rtn", "w8a8"), row(table, "rtn", "w4a16g128")
    assert (fp["arc_easy"], fp["avg"], fp["drop %"]) == (pytest.approx(80.0), pytest.approx(70.0), 0)
    assert w8["avg"] == pytest.approx(65.0) and w8["drop %"] == pytest.approx(100 * 5 / 70)
    assert w4["avg"] == pytest.approx(50.0) and w4["drop %"] == pytest.approx(100 * 20 / 70)
    assert row(table, "rtn", "w4a4")["drop %"] == pytest.approx(100 * 50 / 70)
    w3 = row(table, "rtn", "w3a16")  # missing task: no average over a different task set
    assert pd.isna(w3["gsm8k"]) and pd.isna(w3["Math"]) and pd.isna(w3["avg"]) and pd.isna(w3["drop %"])
    assert w3["QA"] == pytest.approx(50.0)


def test_category_averages_are_recomputed_from_task_columns():
    tasks = ("piqa_local", "gsm8k_local", "humaneval_local", "wikitext_local", "arc_easy", "math500_local",
             "my_task")
    metric = {t: "word_perplexity,none" if t.startswith("wikitext") else "acc,none" for t in tasks}
    fp = dict(zip(tasks, (0.8, 0.6, 0.4, 10.0, 0.6, 0.2, 0.5)))
    q = dict(zip(tasks, (0.7, 0.3, 0.2, 12.0, 0.5, 0.1, 0.5)))
    records = [make_record("m", "fp", None, fp, metric=metric, tasks=tasks),
               make_record("m", "rtn", "w4a16", q, metric=metric, tasks=tasks)]
    [table] = tables_of(records).values()
    assert list(table.columns) == ["bits", "method", "status", "piqa_local", "arc_easy", "gsm8k_local",
                                   "math500_local", "humaneval_local", "my_task", "wikitext_local",
                                   "QA", "Math", "Code", "avg", "drop %"]
    assert table.attrs["categories"] == {"QA": ["piqa_local", "arc_easy"], "Math": ["gsm8k_local", "math500_local"],
                                         "Code": ["humaneval_local"]}
    w4 = row(table, "rtn", "w4a16")
    assert (w4["QA"], w4["Math"], w4["Code"]) == (pytest.approx(60.0), pytest.approx(20.0), pytest.approx(20.0))
    assert w4["avg"] == pytest.approx(100 * (0.7 + 0.3 + 0.2 + 0.5 + 0.1 + 0.5) / 6)  # perplexity left out
    fp_avg = 100 * (0.8 + 0.6 + 0.4 + 0.6 + 0.2 + 0.5) / 6
    assert w4["drop %"] == pytest.approx(100 * (fp_avg - w4["avg"]) / fp_avg)
    assert w4["wikitext_local"] == pytest.approx(12.0)
    notes = "\n".join(table.attrs["notes"])
    assert "exclude lower-is-better tasks: wikitext_local" in notes and "in no category: my_task" in notes


def test_best_per_bit_setting_is_marked():
    records = [make_record("m", "fp", None, {"arc_easy": 0.9, "gsm8k": 0.9}),
               make_record("m", "rtn", "w4a16", {"arc_easy": 0.5, "gsm8k": 0.7}),
               make_record("m", "gptq", "w4a16", {"arc_easy": 0.6, "gsm8k": 0.7}),
               make_record("m", "awq", "w3a16", {"arc_easy": 0.1, "gsm8k": 0.1})]  # alone at w3: unmarked
    [table] = tables_of(records).values()
    gptq, rtn = (labels(table).index(label) for label in (("gptq", "w4a16"), ("rtn", "w4a16")))
    assert table.attrs["best"] == {(gptq, "arc_easy"), (gptq, "QA"), (gptq, "avg"), (gptq, "drop %"),
                                   (gptq, "gsm8k"), (gptq, "Math"), (rtn, "gsm8k"), (rtn, "Math")}  # ties both
    md = report.to_markdown(table).splitlines()
    assert md[2 + gptq].count("**") == 2 * 6 and md[2 + rtn].count("**") == 2 * 2
    assert "**" not in md[2 + labels(table).index(("awq", "w3a16"))] and "**" not in md[2]  # FP never marked
    assert r"\textbf{60.0}" in report.to_latex(table)


def test_failed_and_missing_runs_are_shown(tables):
    table = m1_table(tables)
    failed = row(table, "gptq", "w4a16g128")
    assert failed["status"] == "failed: RuntimeError: out of memory"
    missing = row(table, "rtn", "w4a16")  # m2 has it, m1 not: a missing run
    assert missing["status"] == "missing" and missing[["arc_easy", "gsm8k", "avg"]].isna().all()
    text = report.to_markdown(table)
    failed_line = next(line for line in text.splitlines() if "gptq" in line)
    assert failed_line.count("—") == 6  # two tasks, two categories, avg, drop
    assert "missing runs (no record): rtn w4a16" in text and "failed runs: gptq w4a16g128" in text
    cells = [c.strip() for line in text.splitlines() for c in line.split("|")]
    assert "80.0" in cells and "28.6" in cells  # percent, one decimal


def test_missing_fp_record_is_reported_not_fatal(tables):
    m2 = tables["m2"]
    assert row(m2, "fp", "fp")["status"] == "missing"
    assert set(m2["drop %"]) == {report.NO_FP}
    assert any("no finished FP record" in n for n in m2.attrs["notes"])
    assert "n/a (no FP record)" in report.to_markdown(m2)
    assert len(m2) == 7  # every label of its setting: the m1 runs appear as missing
    [m1_64] = [t for title, t in tables.items() if title.startswith("m1") and len(t) == 2]
    assert labels(m1_64) == [("fp", "fp"), ("rtn", "w8a8")] and row(m1_64, "rtn", "w8a8")["drop %"] == report.NO_FP


def test_perplexity_is_raw_and_its_increase_is_a_drop():
    records = [make_record("m3", "fp", None, {"wikitext": 10.0}, metric="word_perplexity,none", tasks=["wikitext"]),
               make_record("m3", "rtn", "w4a16", {"wikitext": 12.5}, metric="word_perplexity,none", tasks=["wikitext"])]
    [table] = tables_of(records).values()
    assert row(table, "rtn", "w4a16")["drop %"] == pytest.approx(25.0)  # positive = worse
    assert row(table, "rtn", "w4a16")["wikitext"] == pytest.approx(12.5)  # raw, not x100
    assert " 12.50 |" in report.to_markdown(table)
    assert "QA" not in table.columns  # perplexity is in no category


def test_base_and_instruct_side_by_side():
    records = [make_record("x-base", "fp", None, {"arc_easy": 0.8, "gsm8k": 0.4}),
               make_record("x-base", "rtn", "w4a16", {"arc_easy": 0.6, "gsm8k": 0.2}),
               make_record("x-instruct", "fp", None, {"arc_easy": 0.9, "gsm8k": 0.6}, chat=True),
               make_record("x-instruct", "rtn", "w4a16", {"arc_easy": 0.9, "gsm8k": 0.5}, chat=True),
               make_record("x-instruct", "gptq", "w4a16", {}, status="failed", error=ERROR, chat=True),
               make_record("y-instruct", "fp", None, {"arc_easy": 0.5}, tasks=["arc_easy"])]  # other setting
    tables = report.study_tables(report.records_frame(records))
    [pair] = report.side_by_side_tables(tables)
    assert pair.attrs["title"] == "x-base-vs-instruct"
    assert list(pair.columns) == ["bits", "method", "status (base)", "QA (base)", "Math (base)", "avg (base)",
                                  "drop % (base)", "status (instruct)", "QA (instruct)", "Math (instruct)",
                                  "avg (instruct)", "drop % (instruct)"]
    assert labels(pair) == [("fp", "fp"), ("gptq", "w4a16"), ("rtn", "w4a16")]
    rtn = row(pair, "rtn", "w4a16")
    assert rtn["drop % (base)"] == pytest.approx(100 * 20 / 60)
    assert rtn["drop % (instruct)"] == pytest.approx(100 * 5 / 75)
    assert row(pair, "gptq", "w4a16")["status (base)"] == "missing"
    assert "| x-base" not in report.to_markdown(pair) and "70.0" in report.to_markdown(pair)


def check_tabular(tex):
    """Assert `tex` holds one well-formed booktabs tabular; return its body rows."""
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    spec = re.search(r"\\begin\{tabular\}\{([lcr]+)\}", tex).group(1)
    body = tex[tex.index(r"\begin{tabular}"):tex.index(r"\end{tabular}")].splitlines()[1:]
    assert [l for l in body if "rule" in l] == [r"\toprule", r"\midrule", r"\bottomrule"]
    rows = [l for l in body if "rule" not in l]
    for line in rows:
        assert line.endswith(r"\\")
        assert len(re.findall(r"(?<!\\)&", line)) == len(spec) - 1, line
        assert not re.search(r"(?<!\\)[_%#$]", line), line  # specials escaped
        assert line.count("{") == line.count("}"), line
    assert all(l.startswith("%") for l in tex[:tex.index(r"\begin{tabular}")].splitlines())  # comments only
    return rows


def test_latex_is_a_booktabs_tabular(tables):
    table = m1_table(tables)
    tex = report.to_latex(table)
    rows = check_tabular(tex)
    assert len(rows) == 1 + len(table)
    assert rows[0].startswith(r"bits & method & status & arc\_easy & gsm8k & QA & Math & avg & drop \%")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not on PATH; compile check skipped")
def test_latex_compiles(tables, tmp_path):
    doc = "\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n%s\\end{document}\n"
    (tmp_path / "t.tex").write_text(doc % report.to_latex(m1_table(tables)))
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]


def test_main_writes_tables_findings_and_figures(tmp_path, capsys):
    results = ResultStore(tmp_path / "results")
    for record in study_records():
        results.write(record)
    out = tmp_path / "reports"
    assert report.main(["--store", str(results.root), "--out", str(out), "--method", "fp,rtn", "--sweep", "s1"]) == 0
    printed = capsys.readouterr().out
    assert "## m2" in printed and "gptq" not in printed and "## Findings" in printed
    assert (out / "report-s1.md").read_text().strip() == printed.strip()
    [m1] = [p for p in out.glob("m1-*-s1.csv") if pd.read_csv(p)["status"].iloc[0] == "done"]
    assert pd.read_csv(m1)["avg"].iloc[0] == pytest.approx(70.0)
    check_tabular(m1.with_suffix(".tex").read_text())
    assert "| bits" in m1.with_suffix(".md").read_text()
    drop_png = m1.with_name(m1.stem + "-drop.png")
    assert drop_png.stat().st_size > 1000 and drop_png.with_suffix(".pdf").stat().st_size > 1000
    assert report.main(["--store", str(results.root), "--out", str(out), "--format", "latex", "--model", "m2"]) == 0
    check_tabular((out / "m2.tex").read_text())
    assert not (out / "m2.csv").exists()
    assert report.main(["--store", str(results.root), "--bits", "w2a16"]) == 1


def test_repeated_runs_are_told_apart_by_their_settings():
    records = [make_record("m1", "fp", None, {"arc_easy": 0.8, "gsm8k": 0.6})]
    for masking, n in (("none", 32), ("random", 32), ("random", 64)):
        rec = make_record("m1", "gptq", "w4a16g128", {"arc_easy": 0.7, "gsm8k": 0.5})
        rec["spec"]["calib"] = {"masking": masking, "n_samples": n, "seed": 0}
        records.append(rec)
    [table] = tables_of(records).values()
    [note] = [n for n in table.attrs["notes"] if n.startswith("several records")]
    assert note == ("several records for gptq w4a16g128, in row order: "
                    "calib.masking: none | random | random; calib.n_samples: 32 | 32 | 64")
