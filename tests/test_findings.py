import pytest

from qdlm_bench import findings, report
from qdlm_bench.store import new_record

TASKS = ("arc_easy", "gsm8k_local", "humaneval_local")


def rec(model, method, bits, qa, math, code, status="done", chat=False):
    """A record of three tasks (QA, Math, Code) with the given fractions."""
    spec = {"model": {"name": model}, "method": {"name": method}, "quant": {"bits": bits}, "tasks": list(TASKS),
            "eval": {"apply_chat_template": chat}, "dtype": "float32", "seed": 0}
    values = dict(zip(TASKS, (qa, math, code))) if status == "done" else {}
    return new_record(spec, status=status, metrics={t: {"metric": "acc,none", "value": v} for t, v in values.items()})


def check(records) -> dict[str, findings.Finding]:
    return {f.key: f for f in findings.check(report.study_tables(report.records_frame(records)))}


def verdicts(records) -> dict[str, str]:
    return {key: f.verdict for key, f in check(records).items()}


FP = rec("m-base", "fp", None, 0.8, 0.6, 0.4)


def test_near_lossless_holds_and_fails():
    holds = verdicts([FP, rec("m-base", "gptq", "w4a16g128", 0.8, 0.6, 0.398),  # drop 0.11 %
                      rec("m-base", "rtn", "w8a8", 0.8, 0.6, 0.4)])
    assert holds["w4_weight_only_lossless"] == holds["w8a8_lossless"] == findings.HOLDS
    fails = check([FP, rec("m-base", "rtn", "w4a16", 0.7, 0.6, 0.4),  # drop 5.6 %
                   rec("m-base", "gptq", "w4a16", 0.79, 0.6, 0.4),  # drop 0.56 %
                   rec("m-base", "awq", "w4a16g128", 0.7, 0.5, 0.4),
                   rec("m-base", "rtn", "w4a4", 0.1, 0.1, 0.1)])  # not weight-only: ignored
    w4 = fails["w4_weight_only_lossless"]
    assert w4.verdict == findings.FAILS and [ok for ok, _ in w4.checks] == [True, False, False]
    assert "m-base gptq w4a16: drop 0.56%" in w4.to_markdown()
    assert fails["w8a8_lossless"].verdict == findings.NO_DATA


def test_rotation_against_smoothquant():
    runs = [FP, rec("m-base", "smoothquant", "w4a4", 0.4, 0.3, 0.2), rec("m-base", "quarot", "w4a4", 0.6, 0.4, 0.3)]
    assert verdicts(runs)["rotation_beats_smoothquant"] == findings.HOLDS
    tie = check(runs + [rec("m-base", "duquant", "w4a4", 0.3, 0.2, 0.1)])["rotation_beats_smoothquant"]
    assert tie.verdict == findings.FAILS and len(tie.checks) == 2  # one of two is not a majority
    at_w8 = [FP, rec("m-base", "smoothquant", "w8a8", 0.4, 0.3, 0.2), rec("m-base", "quarot", "w8a8", 0.6, 0.4, 0.3)]
    assert verdicts(at_w8)["rotation_beats_smoothquant"] == findings.NO_DATA


def test_gptq_against_awq_at_the_same_bits():
    runs = [FP, rec("m-base", "gptq", "w4a16", 0.7, 0.5, 0.3), rec("m-base", "awq", "w4a16", 0.6, 0.5, 0.3),
            rec("m-base", "gptq", "w3a16", 0.5, 0.4, 0.3), rec("m-base", "awq", "w3a16", 0.6, 0.4, 0.3),
            rec("m-base", "gptq", "w2a16", 0.3, 0.2, 0.1), rec("m-base", "awq", "w2a16", 0.2, 0.1, 0.1),
            rec("m-base", "awq", "w8a16", 0.8, 0.6, 0.4)]  # no GPTQ at w8: no check
    found = check(runs)["gptq_beats_awq"]
    assert found.verdict == findings.HOLDS and [ok for ok, _ in found.checks] == [True, False, True]
    assert "w3a16: gptq avg 40.00 vs awq 43.33" in found.to_markdown()
    assert verdicts([FP, rec("m-base", "gptq", "w4a16", 0.7, 0.5, 0.3)])["gptq_beats_awq"] == findings.NO_DATA


def test_math_and_code_drop_more_than_qa():
    # QA drops 12.5 %, Math 50 %, Code 25 %; the near-lossless run gives no check
    runs = [FP, rec("m-base", "rtn", "w3a16", 0.7, 0.3, 0.3), rec("m-base", "rtn", "w8a8", 0.8, 0.6, 0.4)]
    found = check(runs)["math_code_drop_more"]
    assert found.verdict == findings.HOLDS and len(found.checks) == 2
    assert "Math drop 50.00% vs QA 12.50%" in found.to_markdown()
    qa_worst = check([FP, rec("m-base", "rtn", "w3a16", 0.4, 0.55, 0.38)])["math_code_drop_more"]
    assert qa_worst.verdict == findings.FAILS
    assert verdicts([FP])["math_code_drop_more"] == findings.NO_DATA


def test_instruct_drops_less_than_base():
    base = [FP, rec("m-base", "rtn", "w3a16", 0.6, 0.4, 0.2), rec("m-base", "rtn", "w4a16", 0.8, 0.6, 0.4)]
    instruct = [rec("m-instruct", "fp", None, 0.8, 0.6, 0.4, chat=True),
                rec("m-instruct", "rtn", "w3a16", 0.7, 0.5, 0.3, chat=True),
                rec("m-instruct", "rtn", "w4a16", 0.8, 0.6, 0.4, chat=True)]
    found = check(base + instruct)["instruct_drops_less"]
    assert found.verdict == findings.HOLDS and len(found.checks) == 1  # w4a16: lossless in both
    swapped = [rec("m-instruct" if r["model"] == "m-base" else "m-base", r["method"], r["bits"],
                   *(r["metrics"][t]["value"] for t in TASKS), chat=r["model"] == "m-base") for r in base + instruct]
    assert verdicts(swapped)["instruct_drops_less"] == findings.FAILS
    assert verdicts(base)["instruct_drops_less"] == findings.NO_DATA


def test_failed_runs_give_no_checks_and_every_finding_prints():
    found = check([FP, rec("m-base", "rtn", "w4a16", None, None, None, status="failed")])
    assert all(f.verdict == findings.NO_DATA for f in found.values())
    text = findings.to_markdown(list(found.values()))
    assert text.count(f": {findings.NO_DATA}") == 6


@pytest.mark.parametrize("oks, verdict", [([], "not enough data"), ([True], "holds"), ([True, False], "fails"),
                                          ([True, True, False], "holds")])
def test_verdict_is_the_majority_of_checks(oks, verdict):
    assert findings.Finding("k", "claim", [(ok, "") for ok in oks]).verdict == verdict
