"""lm-eval adapter, task resolution, per-task settings and the offline tasks, on a tiny random model."""

import math
import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from qdlm_bench import diffusion, evaluation  # noqa: E402
from qdlm_bench.evaluation import EvalSettings, adapter, tasks  # noqa: E402
from qdlm_bench.models import DiffusionLM, DLLMConfig  # noqa: E402
from qdlm_bench.models.tokenizer import byte_tokenizer  # noqa: E402

DATA_DIR = tasks.default_data_dir()
needs_data = pytest.mark.skipif(
    not DATA_DIR.is_dir(), reason=f"offline benchmark data not found at {DATA_DIR} (set QDLM_DATA_DIR)")
LOCAL = sorted(n for n in tasks.local_tasks() if n.endswith("_local"))
SHORT = {"gen_length": 16, "steps": 16, "block_length": 8}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = DLLMConfig(family="llada", vocab_size=len(tok), d_model=32, n_layers=2, n_heads=4, n_kv_heads=4,
                     d_ff=64, max_seq_len=1024, mask_token_id=tok.convert_tokens_to_ids("<|mask|>"),
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return DiffusionLM(cfg).eval()


def _request(task, kind, args, idx=0):
    return Instance(request_type=kind, doc={}, arguments=args, idx=idx, metadata=(task, 0, 1))


def _check_result(result, low=0.0, high=1.0):
    assert set(result) >= {"metric", "value", "stderr", "all"}
    assert math.isfinite(result["value"]) and low <= result["value"] <= high
    assert result["all"][result["metric"]] == result["value"]
    assert result["stderr"] is None or math.isfinite(result["stderr"])


# ------------------------------------------------------------------------------- tokenizer

def test_byte_tokenizer_round_trips_bytes_and_has_distinct_special_tokens(tok):
    text = "héllo\n\tworld 😀 {x}"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8")) and tok.decode(ids) == text
    special = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|mask|>", "<|user|>", "<|assistant|>")]
    assert len(set(special)) == 4 and min(special) >= 256 and max(special) < len(tok)
    assert tok.eos_token_id == tok.pad_token_id == special[0]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|user|>") and chat.endswith("<|assistant|>\n")
    assert tok(chat)["input_ids"][0] == special[2]  # role markers encode as single tokens


# -------------------------------------------------------------------------------- settings

def test_settings_reject_unknown_keys():
    with pytest.raises(ValueError, match="unknown eval setting.*'mcnum'"):
        EvalSettings.from_dict({"mcnum": 3})
    with pytest.raises(ValueError, match="unknown key.*'gen_len'"):
        EvalSettings.from_dict({"generation": {"gsm8k": {"gen_len": 3}}})


def test_per_task_settings_precedence():
    plain = EvalSettings()
    assert plain.for_task("gsm8k_local")["gen_length"] == 256 and plain.fewshot_for("gsm8k_local") == 4
    assert plain.for_task("humaneval_local")["gen_length"] == 512 and plain.fewshot_for("mbpp_local") == 3
    assert plain.for_task("mmlu_local_anatomy")["mc_num"] == 1 and plain.fewshot_for("mmlu_local_anatomy") == 5
    assert plain.for_task("arc_easy_local")["mc_num"] == 128 and plain.fewshot_for("unlisted_task") is None
    assert plain.for_task("mini_math", {"max_gen_toks": 48})["gen_length"] == 48  # YAML hint, no study default
    s = EvalSettings.from_dict({"mc_num": 8, "num_fewshot": {"gsm8k": 2, "gsm8k_local": 0},
                                "generation": {"gsm8k": {"steps": 64}, "arc": {"mc_num": 3}}},
                               generation_defaults={"gen_length": 99, "remasking": "random"})
    gsm = s.for_task("gsm8k_local", {"block_length": 16})
    assert (gsm["gen_length"], gsm["steps"], gsm["block_length"], gsm["remasking"]) == (256, 64, 16, "random")
    assert s.fewshot_for("gsm8k_local") == 0 and s.fewshot_for("gsm8k") == 2  # longest prefix wins
    assert s.for_task("arc_easy_local")["mc_num"] == 3 and s.for_task("mmlu_local")["mc_num"] == 8
    assert s.generation_config("mini_math").gen_length == 99


def test_primary_metric_choice():
    gsm = {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2}
    assert evaluation.primary_metric("gsm8k_local", gsm) == "exact_match,flexible-extract"
    assert evaluation.primary_metric("hellaswag_local", {"acc,none": 0.3, "acc_norm,none": 0.4}) == "acc_norm,none"
    assert evaluation.primary_metric("humaneval", {"pass@1,create_test": 0.1}) == "pass@1,create_test"
    assert evaluation.primary_metric("mini_qa", {"acc_norm,none": 0.1, "acc,none": 0.2}) == "acc,none"
    summary = evaluation.harness.summarize("piqa_local", {"alias": "p", "acc,none": 0.5, "acc_stderr,none": "N/A"})
    assert summary == {"metric": "acc,none", "value": 0.5, "stderr": None, "all": {"acc,none": 0.5}}


# ---------------------------------------------------------------------------- resolution

def test_unknown_task_lists_local_tasks_and_accepts_lm_eval_names(monkeypatch):
    class FakeIndex:
        all_tasks = ["gsm8k"]

    monkeypatch.setattr(tasks, "lm_eval_tasks", lambda: FakeIndex())
    assert tasks.resolve_tasks(["gsm8k"]) == ["gsm8k"]  # an lm-eval name passes through
    with pytest.raises(ValueError, match="unknown task 'no_such_task'") as err:
        tasks.validate_tasks(["no_such_task"])
    assert "arc_easy_local" in str(err.value) and "lm-eval" in str(err.value)


def test_missing_data_fails_before_any_model_work(tmp_path):
    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"model.{name} used before the task data was checked")

    with pytest.raises(ValueError, match="gsm8k/train.jsonl.*eval.data_dir="):
        evaluation.run(Untouchable(), Untouchable(), ["gsm8k_local"], EvalSettings(data_dir=str(tmp_path)))


@needs_data
def test_mmlu_local_expands_to_57_subject_tasks():
    (group,) = tasks.resolve_tasks(["mmlu_local"], DATA_DIR)
    subjects = group["task"]
    assert group["group"] == "mmlu_local" and len(subjects) == 57
    anatomy = next(t for t in subjects if t["task"] == "mmlu_local_anatomy")
    assert anatomy["dataset_kwargs"]["test"] == str(DATA_DIR / "mmlu/test/anatomy_test.csv")
    assert "{{subject}}" in anatomy["description"]  # Jinja braces are not placeholders


EXPECTED_FIRST_TARGET = {  # the first test doc of each offline task, from the original files
    "arc_challenge_local": 2, "arc_easy_local": 0, "gsm8k_local": "#### 18", "hellaswag_local": 3,
    "humaneval_local": "check(has_close_elements)", "math500_local": "\\left( 3, \\frac{\\pi}{2} \\right)",
    "mbpp_local": 'assert remove_Occ("hello","l") == "heo"', "mmlu_local": 1, "piqa_local": 0,
    "wikitext_local": "= Robert Boulter =", "winogrande_local": "always got the easier cases.",
}
EXPECTED_DOCS = {"arc_challenge_local": 1172, "arc_easy_local": 2376, "gsm8k_local": 1319, "hellaswag_local": 1000,
                 "humaneval_local": 164, "math500_local": 500, "mbpp_local": 500, "mmlu_local": 14042,
                 "piqa_local": 1838, "wikitext_local": 62, "winogrande_local": 1267}


@needs_data
@pytest.mark.parametrize("name", LOCAL)
def test_local_task_loads_and_renders_its_first_doc(name):
    (obj,) = tasks.build_tasks(tasks.resolve_tasks([name], DATA_DIR))
    leaves = tasks.leaf_tasks([obj])
    assert sum(len(t.eval_docs) for t in leaves) == EXPECTED_DOCS[name]
    task = leaves[0]
    shots = EvalSettings().fewshot_for(task.task_name) or 0
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(0)
    doc = task.eval_docs[0]
    prompt = task.fewshot_context(doc, shots)
    prompt = prompt[task.doc_to_text(doc)] if isinstance(prompt, list) else prompt  # winogrande: gold context
    target = task.doc_to_target(doc)
    expected = EXPECTED_FIRST_TARGET[name]
    assert expected == target if isinstance(expected, int) else expected in target
    if task.OUTPUT_TYPE == "loglikelihood_rolling":
        assert prompt == "" and "Robert Boulter is an English film" in target
    else:
        assert prompt.strip() and target not in ("", None)
    if task.OUTPUT_TYPE == "multiple_choice":  # winogrande: the choices are contexts, the gold is doc_to_text
        gold = task.doc_to_text(doc) if task.multiple_input else target
        assert 0 <= gold < len(task.doc_to_choice(doc))
    if name == "mmlu_local":  # subject description + the subject's 5 dev questions
        assert prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
        assert prompt.count("Answer:") == 6


@needs_data
def test_offline_scoring_accepts_reference_answers_and_rejects_wrong_ones():
    def docs_and_scorer(name):
        (spec,) = tasks.resolve_tasks([name], DATA_DIR)
        return spec["custom_dataset"](**spec["dataset_kwargs"])["test"], spec["process_results"]

    docs, score = docs_and_scorer("humaneval_local")
    for doc in list(docs)[:3]:
        assert score(doc, [doc["canonical_solution"]]) == {"pass@1": 1.0}
        assert score(doc, ["    return None\n"]) == {"pass@1": 0.0}
    docs, score = docs_and_scorer("mbpp_local")
    for doc in list(docs)[:3]:
        assert score(doc, [doc["code"]]) == {"pass@1": 1.0}
        assert score(doc, ["def nothing():\n    pass\n"]) == {"pass@1": 0.0}
    docs, score = docs_and_scorer("math500_local")
    for doc in list(docs)[:20]:
        # a lone \boxed{}: [invalidanswer] for exact_match, as lm-eval's minerva_math500; math_verify reads the box
        assert score(doc, [doc["solution"]]) == {"exact_match": 0, "math_verify": 1}
        final = f"blah\nFinal Answer: The final answer is ${doc['answer']}$. I hope it is correct."
        assert score(doc, [final]) == {"exact_match": 1, "math_verify": 1}
        wrong = "Final Answer: The final answer is $-12345$. I hope it is correct."
        assert score(doc, [wrong]) == {"exact_match": 0, "math_verify": 0}


# ------------------------------------------------------------------------------- adapter

def test_generation_is_cut_at_eos_then_at_stop_strings(model, tok, monkeypatch):
    text = "42 is it.\nQuestion: more"
    fake = tok(text)["input_ids"] + [tok.eos_token_id] + tok("junk")["input_ids"]
    monkeypatch.setattr(diffusion, "generate", lambda m, prompts, cfg, **kw: [fake for _ in prompts])
    lm = adapter.DiffusionLMAdapter(model, tok, EvalSettings())
    reqs = [_request("gsm8k_local", "generate_until", ("Q", {"until": ["Question:"]})),
            _request("gsm8k_local", "generate_until", ("Q", {"until": ["never"]})),
            _request("gsm8k_local", "generate_until", ("Q", {"until": ["it", "\n"]}))]
    assert lm.generate_until(reqs) == ["42 is it.\n", text, "42 is "]


def test_each_task_gets_its_own_sampler_and_mc_settings(model, tok, monkeypatch):
    seen = []
    monkeypatch.setattr(diffusion, "generate", lambda m, prompts, cfg, **kw: seen.append(cfg) or [[65]] * len(prompts))
    monkeypatch.setattr(diffusion, "loglikelihood",
                        lambda m, pairs, mc_num, **kw: seen.append(mc_num) or [-1.0] * len(pairs))
    lm = adapter.DiffusionLMAdapter(model, tok, EvalSettings.from_dict({"generation": {"humaneval": {"steps": 64}}}))
    lm.generate_until([_request("gsm8k_local", "generate_until", ("a", {"until": []})),
                       _request("humaneval_local", "generate_until", ("b", {"until": []}))])
    lm.loglikelihood([_request(task, "loglikelihood", ("a", choice), idx=i)  # multiple choice: a request per choice
                      for task in ("arc_easy_local", "mmlu_local_anatomy") for i, choice in enumerate((" b", " c"))])
    assert [(c.gen_length, c.steps, c.block_length) for c in seen[:2]] == [(256, 256, 32), (512, 64, 32)]
    assert seen[2:] == [128, 1]


def test_loglikelihood_splits_context_and_continuation_like_lm_eval(model, tok):
    lm = adapter.DiffusionLMAdapter(model, tok)
    prefix, target = lm.encode_pair("Answer: ", "yes")
    assert tok.decode(prefix) == "Answer:" and tok.decode(target) == " yes"


# --------------------------------------------------------------------- end to end (lm-eval)

@needs_data
def test_run_likelihood_tasks_end_to_end(model, tok):
    settings = EvalSettings.from_dict({"limit": 3, "mc_num": 2, "batch_size": 64, "data_dir": str(DATA_DIR),
                                       "generation": {"wikitext": {"max_length": 128}}})
    out = evaluation.run(model, tok, ["arc_easy_local", "wikitext_local"], settings)
    assert set(out) == {"arc_easy_local", "wikitext_local"}
    _check_result(out["arc_easy_local"])
    assert out["arc_easy_local"]["metric"] == "acc,none"
    _check_result(out["wikitext_local"], low=1.0, high=math.inf)
    assert out["wikitext_local"]["metric"] == "word_perplexity,none"
    assert out["wikitext_local"]["all"]["bits_per_byte,none"] > 0


@needs_data
def test_run_generation_task_end_to_end(model, tok):
    settings = EvalSettings.from_dict({"limit": 2, "num_fewshot": {"gsm8k": 0}, "generation": {"gsm8k": SHORT},
                                       "data_dir": str(DATA_DIR), "log_samples": True})
    out = evaluation.run(model, tok, ["gsm8k_local"], settings)["gsm8k_local"]
    _check_result(out)
    assert out["metric"] == "exact_match,flexible-extract" and "exact_match,strict-match" in out["all"]
    assert sorted({s["doc_id"] for s in out["samples"]}) == [0, 1]
    assert out["samples"][0]["arguments"][0][0].count("Question:") == 1  # zero-shot


@needs_data
def test_run_applies_fewshot_override_and_chat_template(model, tok):
    settings = EvalSettings.from_dict({"limit": 1, "num_fewshot": {"gsm8k_local": 1}, "generation": {"gsm8k": SHORT},
                                       "apply_chat_template": True, "data_dir": str(DATA_DIR), "log_samples": True})
    out = evaluation.run(model, tok, ["gsm8k_local"], settings)["gsm8k_local"]
    prompt = out["samples"][0]["arguments"][0][0]
    assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>\n")
    assert prompt.count("Question:") == 2  # one example (as its own turn) + the question
