import re
import shutil
import subprocess

import pandas as pd
import pytest

from qdlm_bench import report
from qdlm_bench.store import ResultStore, new_record

ERROR = "Traceback (most recent call last):\n  File \"run.py\", line 1\nRuntimeError: out of memory"


def make_record(model, method, bits, values, metric="acc,none", status="done", error=None, **eval_cfg):
    spec = {"model": {"name": model}, "method": {"name": method}, "quant": {"bits": bits},
            "tasks": ["arc_easy", "gsm8k"], "eval": {"gen_length": 32, **eval_cfg}, "calib": {},
            "dtype": "bfloat16", "seed": 0}
    metrics = {task: {"metric": metric, "value": v, "stderr": 0.01, "all": {metric: v}}
               for task, v in values.items()}
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
        make_record("m2", "rtn", "w4a16", {"arc_easy": 0.5, "gsm8k": 0.5}),
    ]


@pytest.fixture
def table():
    return report.study_table(report.records_frame(study_records()), "m1")


def labels(table):
    return [(m, None if pd.isna(b) else b) for m, b in zip(table["method"], table["bits"])]


def row(table, method, bits, nth=0):
    return table.iloc[[i for i, label in enumerate(labels(table)) if label == (method, bits)][nth]]


def test_records_frame_columns():
    frame = report.records_frame(study_records())
    assert len(frame) == 8
    assert report.task_columns(frame) == ["arc_easy", "gsm8k"]
    assert frame.loc[1, "gsm8k"] == 0.40 and frame.loc[1, "gsm8k:stderr"] == 0.01
    assert frame.loc[1, "gsm8k:metric"] == "acc,none"
    assert frame.loc[2, "error"] == "RuntimeError: out of memory"
    assert list(report.records_frame([]).columns) == list(report.META)


def test_rows_sorted_fp_first_then_bits_descending(table):
    assert labels(table) == [
        ("fp", None), ("rtn", "w8a8"), ("rtn", "w8a8"), ("gptq", "w4a16g128"), ("rtn", "w4a16g128"),
        ("rtn", "w4a4"), ("rtn", "w3a16")]
    assert list(table.columns) == ["bits", "method", "status", "arc_easy", "gsm8k", "avg", "drop %"]


def test_averages_and_drops(table):
    fp, w8, w4 = row(table, "fp", None), row(table, "rtn", "w8a8"), row(table, "rtn", "w4a16g128")
    assert (fp["arc_easy"], fp["avg"], fp["drop %"]) == (pytest.approx(80.0), pytest.approx(70.0), 0)
    assert w8["avg"] == pytest.approx(65.0) and w8["drop %"] == pytest.approx(100 * 5 / 70)
    assert w4["avg"] == pytest.approx(50.0) and w4["drop %"] == pytest.approx(100 * 20 / 70)
    assert row(table, "rtn", "w4a4")["drop %"] == pytest.approx(100 * 50 / 70)
    w3 = row(table, "rtn", "w3a16")  # missing task: no average over a different task set
    assert pd.isna(w3["gsm8k"]) and pd.isna(w3["avg"]) and pd.isna(w3["drop %"])


def test_failed_run_and_missing_values_shown(table):
    failed = row(table, "gptq", "w4a16g128")
    assert failed["status"] == "failed: RuntimeError: out of memory"
    text = report.to_markdown(table)
    failed_line = next(line for line in text.splitlines() if "gptq" in line)
    assert failed_line.count("—") == 4  # two tasks, avg, drop
    cells = [c.strip() for line in text.splitlines() for c in line.split("|")]
    assert "80.0" in cells and "28.6" in cells  # percent, one decimal


def test_missing_fp_record_is_reported_not_fatal(table):
    # the gen_length=64 run has a different baseline_key; the FP record of gen_length=32 is not its baseline
    assert row(table, "rtn", "w8a8", nth=1)["drop %"] == report.NO_FP
    assert any("no finished FP record" in n and "rtn w8a8" in n for n in table.attrs["notes"])
    m2 = report.study_table(report.records_frame(study_records()), "m2")
    assert list(m2["drop %"]) == [report.NO_FP]
    assert "n/a (no FP record)" in report.to_markdown(m2)
    with pytest.raises(ValueError, match="no records"):
        report.study_table(report.records_frame(study_records()), "m9")


def test_perplexity_is_raw_and_its_increase_is_a_drop():
    records = [make_record("m3", "fp", None, {"wikitext": 10.0}, metric="word_perplexity,none"),
               make_record("m3", "rtn", "w4a16", {"wikitext": 12.5}, metric="word_perplexity,none")]
    table = report.study_table(report.records_frame(records), "m3")
    assert row(table, "rtn", "w4a16")["drop %"] == pytest.approx(25.0)  # positive = worse
    assert row(table, "rtn", "w4a16")["wikitext"] == pytest.approx(12.5)  # raw, not x100
    assert " 12.50 |" in report.to_markdown(table)


def test_perplexity_is_left_out_of_a_mixed_average():
    def rec(method, bits, ppl, acc):
        r = make_record("m4", method, bits, {"arc_easy": acc})
        r["metrics"]["wikitext"] = {"metric": "word_perplexity,none", "value": ppl}
        return r
    table = report.study_table(report.records_frame([rec("fp", None, 10.0, 0.5), rec("rtn", "w4", 20.0, 0.4)]), "m4")
    assert list(table["avg"]) == pytest.approx([50.0, 40.0])
    assert row(table, "rtn", "w4")["drop %"] == pytest.approx(20.0)
    assert any("excludes" in n and "wikitext" in n for n in table.attrs["notes"])


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
    return rows


def test_latex_is_a_booktabs_tabular(table):
    tex = report.to_latex(table)
    rows = check_tabular(tex)
    assert len(rows) == 1 + len(table)
    assert rows[0].startswith(r"bits & method & status & arc\_easy & gsm8k & avg & drop \%")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not on PATH; compile check skipped")
def test_latex_compiles(table, tmp_path):
    doc = "\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n%s\\end{document}\n"
    (tmp_path / "t.tex").write_text(doc % report.to_latex(table))
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "t.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:]


def test_main_writes_tables(tmp_path, capsys):
    results = ResultStore(tmp_path / "results")
    for record in study_records():
        results.write(record)
    out = tmp_path / "reports"
    assert report.main(["--store", str(results.root), "--out", str(out), "--format", "csv",
                        "--method", "fp,rtn", "--sweep", "s1"]) == 0
    printed = capsys.readouterr().out
    assert "## m1" in printed and "## m2" in printed and "gptq" not in printed
    csv = pd.read_csv(out / "m1-s1.csv")
    assert csv["avg"].iloc[0] == pytest.approx(70.0) and "gptq" not in set(csv["method"])
    assert report.main(["--store", str(results.root), "--out", str(out), "--format", "latex",
                        "--model", "m2"]) == 0
    check_tabular((out / "m2.tex").read_text())
    assert report.main(["--store", str(results.root), "--bits", "w2a16"]) == 1
