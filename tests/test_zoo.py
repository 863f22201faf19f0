"""The embedded tiny models' recipe: generators, mini-task files, tokenizer, loss, smoke training."""

import json
import math
import platform
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from qdlm_bench import sandbox
from qdlm_bench.code_exec import run_programs
from qdlm_bench.models.checkpoint import load_model
from qdlm_bench.zoo import corpus, realtext, tasks
from qdlm_bench.zoo.tokenizer import SPECIAL, save_tokenizer, train_tokenizer
from qdlm_bench.zoo.train import RECIPES, diffusion_loss, lr_at
from qdlm_bench.zoo.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
MINI = ROOT / "tasks" / "mini"
DATA = ROOT.parent / "shared" / "data"
SIZES = {"mini_qa": 200, "mini_math": 100, "mini_code": 100, "mini_ppl": 50}
FIELDS = {"mini_qa": {"id", "question", "choices", "answerKey"}, "mini_math": {"question", "answer"},
          "mini_code": {"task_id", "prompt", "canonical_solution", "test", "entry_point"},
          "mini_ppl": {"text"}}


def rows(name):
    return [json.loads(line) for line in (MINI / f"{name}.jsonl").read_text().splitlines()]


def program(row, completion):
    return f"{row['prompt']}{completion}\n\n{row['test']}\ncheck({row['entry_point']})\n"


# ---------------------------------------------------------------------------- generators


@pytest.mark.parametrize("skill", tasks.SKILLS)
def test_generators_are_deterministic_in_the_seed(skill):
    a, b = tasks.items(skill, "train", 40, seed=3), tasks.items(skill, "train", 40, seed=3)
    assert a == b
    assert a != tasks.items(skill, "train", 40, seed=4)


@pytest.mark.parametrize("skill", tasks.SKILLS)
def test_eval_items_never_appear_in_training_output(skill):
    held = tasks.items(skill, "eval", tasks.EVAL_SIZES[skill], tasks.TASK_SEED)
    train = tasks.items(skill, "train", 20_000, seed=0)
    assert all(tasks.is_heldout(it["key"]) for it in held)
    assert not {it["key"] for it in held} & {it["key"] for it in train}
    prompts = {tasks.pair(skill, it)[0] for it in held}
    assert not prompts & {tasks.pair(skill, it)[0] for it in train}
    text = "\n".join(t for s, t in corpus.generated_docs(seed=0, scale=0.05) if s == skill)
    assert not [p for p in prompts if p in text]


def test_calibration_text_mixes_held_out_real_text_and_train_split_items_only():
    mini_ppl = ROOT / "tasks" / "mini" / "mini_ppl.jsonl"
    text = corpus.calibration_text(mini_ppl)
    assert text == corpus.calibration_text(mini_ppl)  # seeded
    assert all(r["text"] in text for r in rows("mini_ppl"))
    assert "Question:" in text and "def " in text and "is a country." in text
    for skill in tasks.SKILLS:
        prompts = [tasks.pair(skill, it)[0] for it in tasks.items(skill, "eval", tasks.EVAL_SIZES[skill], tasks.TASK_SEED)]
        assert not [p for p in prompts if p in text]


def test_qa_facts_of_eval_questions_are_stated_in_training_text():
    facts = [t for s, t in corpus.generated_docs(seed=0, scale=0.05) if s == "facts"]
    assert len(facts) == len(tasks.WORLD) * round(corpus.ARTICLES * 0.05)
    by_name = {c["name"]: c for c in tasks.WORLD}
    for row in rows("mini_qa"):
        name = re.search(r"(?:of|does) (\w+)", row["question"]).group(1)
        answer = row["choices"]["text"]["ABCD".index(row["answerKey"])]
        attr = next(a for a in tasks.ATTRS if by_name[name][a] == answer)
        assert tasks.is_heldout(f"qa|{name}|{attr}")
        # stated in several articles, each sentence naming the country, in several wordings
        stated = {t.format(c=name, v=answer) for t in tasks.ATTRS[attr][0]}
        found = [s for f in facts if f.startswith(f"{name} is a country.") for s in stated if s in f]
        assert len(found) >= 3 and len(set(found)) >= 2


def test_held_out_facts_are_never_asked_in_training_text():
    questions = {q.format(c=c["name"]): (c["name"], a) for c in tasks.WORLD
                 for a, (_, qs) in tasks.ATTRS.items() for q in qs}
    asked = set()
    for skill, text in corpus.generated_docs(seed=0, scale=0.05):
        for q in re.findall(r"Question: ([^\n]*\?)\n", text):
            if q in questions:
                asked.add(questions[q])
    assert len(asked) > 500  # the train split is asked about
    assert not [k for k in asked if tasks.is_heldout(f"qa|{k[0]}|{k[1]}")]
    held = {(r["question"]) for r in rows("mini_qa")}
    assert held <= set(questions) and not {questions[q] for q in held} & asked


# ---------------------------------------------------------------------------- task files


@pytest.mark.parametrize("name", sorted(SIZES))
def test_mini_task_files_have_fields_and_sizes(name):
    data = rows(name)
    assert len(data) == SIZES[name]
    assert all(set(r) == FIELDS[name] for r in data)
    assert (ROOT / "tasks" / f"{name}.yaml").is_file()
    assert sum(p.stat().st_size for p in MINI.glob("*.jsonl")) < 1_000_000


@pytest.mark.parametrize("skill", tasks.SKILLS)
def test_committed_files_are_the_generator_output(skill):
    assert rows(f"mini_{skill}") == tasks.task_rows(skill)
    train = rows(f"mini_{skill}_train")
    assert train == tasks.task_rows(skill, "train") and len(train) == tasks.TRAIN_SIZE
    field = {"math": "question", "code": "prompt", "qa": "question"}[skill]
    assert not {r[field] for r in train} & {r[field] for r in rows(f"mini_{skill}")}


def test_mini_qa_rows_are_well_formed():
    for r in rows("mini_qa"):
        assert r["choices"]["label"] == list("ABCD") and r["answerKey"] in "ABCD"
        assert len(set(r["choices"]["text"])) == 4


def test_mini_math_answers_are_the_arithmetic():
    for r in rows("mini_math"):
        steps = r["answer"].split("\n")
        results = []
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", r["answer"]):
            assert eval(f"{a} {op} {b}") == int(c)
            results.append(int(c))
        assert len(results) == len(steps) - 1 >= 1
        assert steps[-1] == f"#### {results[-1]}"


def test_mini_code_canonical_solutions_pass_and_wrong_ones_fail():
    data = rows("mini_code")
    mode = (sandbox.available() or ["none"])[0]  # the strongest here; scoring does not depend on it
    good = run_programs([program(r, r["canonical_solution"]) for r in data], sandbox_mode=mode)
    assert all(res.passed for res in good), [res.stderr for res in good if not res.passed][:3]
    bad = run_programs([program(r, "    return None\n") for r in data[:10]], sandbox_mode=mode)
    assert not any(res.passed for res in bad)


def test_mini_ppl_is_held_out_real_text():
    if platform.python_version() != realtext.PPL_PYTHON:
        pytest.skip(f"mini_ppl holds Python {realtext.PPL_PYTHON}'s stdlib files; this is {platform.python_version()}")
    held = realtext.heldout_files()
    assert len(held) == realtext.PPL_DOCS
    assert not set(held) & set(realtext.training_files())
    assert set(held) | set(realtext.training_files()) == set(realtext.stdlib_files())
    texts = [r["text"] for r in rows("mini_ppl")]
    assert texts[-realtext.PPL_DOCS:] == [p.read_text() for p in held]
    if not (DATA / realtext.SHAKESPEARE).is_file():
        pytest.skip(f"{DATA / realtext.SHAKESPEARE} absent: cannot check the tinyshakespeare split")
    train_part, docs = realtext.shakespeare_split(DATA)
    assert texts[:realtext.PPL_DOCS] == docs
    assert not any(d[:200] in train_part for d in docs)


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [tasks.text(s, it) for s in tasks.SKILLS for it in tasks.items(s, "train", 300, 0)]
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(texts, vocab_size=400), folder)
    return AutoTokenizer.from_pretrained(folder)


def test_tokenizer_round_trips_and_has_the_special_tokens(tokenizer):
    texts = ["def f(x):\n    return x + 12\n\n\n", "Ünïcödé  tabs\t\tand émojis 🙂", rows("mini_ppl")[0]["text"]]
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.convert_tokens_to_ids(SPECIAL) == [0, 1, 2, 3]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id) == (0, 0, 1)
    assert tokenizer.tokenize("1234") == ["1", "2", "3", "4"]


def test_prompt_and_response_tokenize_as_the_joined_text(tokenizer):
    for skill in tasks.SKILLS:
        for it in tasks.items(skill, "eval", 5, 0):
            prompt, response = tasks.pair(skill, it)
            ids = tokenizer(prompt + response)["input_ids"]
            assert tokenizer(prompt)["input_ids"] + tokenizer(response)["input_ids"] == ids


def test_chat_template_in_llada_style(tokenizer):
    user = [{"role": "user", "content": "Question: 2 + 2?\nAnswer:"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == \
        "<|user|>\nQuestion: 2 + 2?\nAnswer:\n<|assistant|>\n"
    both = user + [{"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(both, tokenize=False).endswith("<|assistant|>\n4<|endoftext|>")


# ---------------------------------------------------------------------------------- loss


class Uniform(torch.nn.Module):
    """Uniform logits over V tokens; records its last input."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        self.seen = ids.clone()
        return torch.zeros(*ids.shape, self.vocab)


@pytest.mark.parametrize("sft", [False, True])
def test_diffusion_loss_is_unbiased_and_never_masks_prompts(sft):
    model, x = Uniform(50), torch.randint(2, 50, (64, 40))
    plen = torch.randint(0, 30, (64,)) if sft else None
    gen = torch.Generator().manual_seed(0)
    losses = [diffusion_loss(model, x, 1, gen, plen).item() for _ in range(400)]
    assert abs(sum(losses) / len(losses) - math.log(50)) < 0.05 * math.log(50)  # E[masked / p] = 1
    if sft:
        prompt = torch.arange(40)[None] < plen[:, None]
        assert torch.equal(model.seen[prompt], x[prompt])


def test_lr_warms_up_then_decays_to_a_tenth():
    r = RECIPES["tiny-llada-base"]
    assert lr_at(r, 0, 0.0) == pytest.approx(r.lr / r.warmup)
    assert lr_at(r, r.warmup, 0.0) == pytest.approx(r.lr)
    assert lr_at(r, 10**6, 1.0) == pytest.approx(0.1 * r.lr)


# ---------------------------------------------------------------------------------- smoke


def test_smoke_training_saves_loadable_checkpoints_and_resumes(tmp_path, capsys):
    base, run = tmp_path / "base", tmp_path / "run"
    train_main(["tiny-llada-base", "--smoke", "--steps", "2", "--out", str(run), "--save-to", str(base)])
    train_main(["tiny-llada-base", "--smoke", "--steps", "3", "--out", str(run), "--save-to", str(base)])
    assert "resumed" in capsys.readouterr().out
    assert torch.load(run / "ckpt.pt", weights_only=False)["step"] == 3
    model, tok = load_model(base)
    assert model.config.family == "llada" and model.dtype == torch.bfloat16
    assert model.config.mask_token_id == tok.mask_token_id == 1
    with safe_open(base / "model.safetensors", "pt") as f:
        assert "model.transformer.blocks.0.q_proj.weight" in f.keys()
    assert "## FP scores" in (base / "README.md").read_text()
    assert "chat_template" in json.loads((base / "tokenizer_config.json").read_text())

    inst = tmp_path / "inst"
    train_main(["tiny-llada-instruct", "--smoke", "--base", str(base), "--out", str(tmp_path / "run2"),
                "--save-to", str(inst)])
    tuned, _ = load_model(inst)
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), model.parameters()))

    dream = tmp_path / "dream"
    train_main(["tiny-dream-base", "--smoke", "--out", str(tmp_path / "run3"), "--save-to", str(dream)])
    hf = json.loads((dream / "config.json").read_text())
    assert hf["model_type"] == "Dream" and hf["num_key_value_heads"] < hf["num_attention_heads"]
    assert load_model(dream)[0].config.shift_logits


def test_quick_check_scores_every_skill_and_both_qa_splits():
    from qdlm_bench.zoo.check import check

    model, tokenizer = load_model(ROOT / "qdlm_bench" / "zoo" / "models" / "tiny-llada-base", dtype=torch.float32)
    scores = check(model, tokenizer, n=2, mc_num=2)
    assert set(scores) == {"math_em", "code_pass", "qa_acc", "qa_train_acc"}
    assert all(0 <= v <= 1 for v in scores.values())
