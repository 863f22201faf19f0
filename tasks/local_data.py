"""Loaders and doc processors of the *_local tasks (offline copies of real benchmarks).

The loaders are the tasks' ``custom_dataset``: lm-eval calls them with the task's
``dataset_kwargs`` (file paths, ``{data_dir}`` already filled in) plus its metadata, which
they ignore. Docs are brought to the format of the Hugging Face dataset that lm-eval's own
task reads, so the prompts below match lm-eval's.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import datasets

MBPP_TEST_IDS = range(11, 511)  # the "full" test split (Austin et al. 2021)
MBPP_PROMPT_IDS = (2, 3, 4)  # the paper's three few-shot examples, as lm-eval's mbpp


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl, .jsonl.gz, .json (a list) or .csv file (CSV values stay strings)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            return [json.loads(line) for line in f if line.strip()]
        if path.suffix == ".json":
            return json.load(f)
        if path.suffix == ".csv":
            return list(csv.DictReader(f))
    raise ValueError(f"unsupported data file {path}: expected .jsonl, .jsonl.gz, .json or .csv")


def _dataset(splits: dict[str, list[dict]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def load_splits(splits: dict[str, str], **_) -> datasets.DatasetDict:
    """One split per file: ``splits`` maps a split name to its file."""
    return _dataset({name: read_rows(path) for name, path in splits.items()})


def load_piqa(docs: str, labels: str, **_) -> datasets.DatasetDict:
    """PIQA's original layout: the docs and their labels (one per line) in two files."""
    rows = read_rows(docs)
    golds = Path(labels).read_text().split()
    if len(golds) != len(rows):
        raise ValueError(f"{labels} has {len(golds)} labels for {len(rows)} docs in {docs}")
    return _dataset({"validation": [{**r, "label": int(g)} for r, g in zip(rows, golds)]})


def load_mbpp(path: str, **_) -> datasets.DatasetDict:
    """MBPP (original release): test = task ids 11-510, prompt = ids 2, 3, 4 (``is_fewshot``)."""
    by_id = {r["task_id"]: r for r in read_rows(path)}
    return _dataset({
        "test": [by_id[i] for i in MBPP_TEST_IDS],
        "prompt": [{**by_id[i], "is_fewshot": True} for i in MBPP_PROMPT_IDS],
    })


def load_mmlu(test: str, dev: str, subject: str, **_) -> datasets.DatasetDict:
    """One MMLU subject from CSVs with header ``question,choice0..3,answer`` (answer 0-3)."""

    def doc(row):
        return {"question": row["question"], "choices": [row[f"choice{i}"] for i in range(4)],
                "answer": int(row["answer"]), "subject": subject.replace("_", " ")}

    return _dataset({"test": [doc(r) for r in read_rows(test)], "dev": [doc(r) for r in read_rows(dev)]})


def load_wikitext(path: str, **_) -> datasets.DatasetDict:
    """WikiText raw test text split into articles at top-level headings (`` = Title = ``).

    The split is the one of EleutherAI/wikitext_document_level, which lm-eval's ``wikitext``
    reads (62 test documents for WikiText-2).
    """
    pages, lines = [], []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        flat = line.replace("= = =", "===").replace("= =", "==").strip()
        if flat.startswith("= ") and flat.endswith(" ="):
            if "".join(lines).strip():
                pages.append("\n".join(lines))
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return _dataset({"test": [{"page": p} for p in pages]})


def process_arc(ds: datasets.Dataset) -> datasets.Dataset:
    """AI2's original ARC rows -> the ``allenai/ai2_arc`` fields (question, choices, answerKey)."""

    def doc(row):
        q = row["question"]
        return {"id": row["id"], "question": q["stem"], "answerKey": row["answerKey"],
                "choices": {"text": [c["text"] for c in q["choices"]],
                            "label": [c["label"] for c in q["choices"]]}}

    return ds.map(doc, remove_columns=ds.column_names)


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def process_hellaswag(ds: datasets.Dataset) -> datasets.Dataset:
    """lm-eval's hellaswag preprocessing: query = activity label + context; cleaned endings."""

    def doc(row):
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return {"query": _hellaswag_clean(row["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_clean(e) for e in row["endings"]], "gold": int(row["label"])}

    return ds.map(doc)


def wikitext_detokenize(doc: dict) -> str:
    """lm-eval's wikitext detokenizer (undoes the tokenized WikiText spacing)."""
    s = doc["page"].replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "),
                 (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        s = s.replace(a, b)
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0"),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        s = s.replace(a, b)
    return s


def wikitext_results(doc: dict, results: list[float]) -> dict:
    """lm-eval's wikitext metrics: words and bytes are counted in the original (tokenized) page."""
    (loglikelihood,) = results
    n_words, n_bytes = len(re.split(r"\s+", doc["page"])), len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, n_words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
