"""Calibration sets: windows, masking, determinism, the on-disk cache, clear errors."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from qdlm_bench import calibration
from qdlm_bench.calibration import sets
from qdlm_bench.calibration import (CalibConfig, CalibSet, build, cache_key, confidences, resolve_source, source_texts,
                                    task_prompts)
from qdlm_bench.models.presets import random_model
from qdlm_bench.models.tokenizer import byte_tokenizer
from qdlm_bench.paths import ZOO_DIR

TOK = byte_tokenizer()
MASK = TOK.mask_token_id


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    return path


def make(path, cache=None, **kw):
    return build({"source": str(path), "n_samples": 16, "seqlen": 64, **kw}, TOK, MASK, cache_dir=cache)


def test_shapes_dtypes_and_windows(text_file):
    calib = make(text_file)
    assert calib.input_ids.shape == (16, 64) and calib.input_ids.dtype == torch.long
    assert calib.masked.shape == (16, 64) and calib.masked.dtype == torch.bool
    assert calib.mask_ratio.shape == (16,) and calib.mask_ratio.dtype == torch.float32
    stream = TOK(text_file.read_text(), add_special_tokens=False)["input_ids"]
    text = "".join(map(chr, stream))
    for row in calib.input_ids.tolist():  # every sample is a contiguous window of the token stream
        assert "".join(map(chr, row)) in text
    assert len({tuple(r) for r in calib.input_ids.tolist()}) > 1
    parts = list(calib.batches(5))
    assert [len(b) for b in parts] == [5, 5, 5, 1] and isinstance(parts[0], CalibSet)
    assert torch.equal(torch.cat([b.input_ids for b in parts]), calib.input_ids)
    assert calib.to("cpu").input_ids.device.type == "cpu"


def test_deterministic_per_seed(text_file):
    a, b, c = make(text_file, seed=0), make(text_file, seed=0), make(text_file, seed=1)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_no_masking_introduces_no_mask_tokens(text_file):
    calib = make(text_file)
    assert not calib.masked.any() and not (calib.input_ids == MASK).any()
    assert torch.equal(calib.mask_ratio, torch.zeros(16))


def test_random_masking(text_file):
    clean = make(text_file)
    calib = make(text_file, masking="random", mask_ratio={"dist": "uniform", "low": 0.0, "high": 1.0})
    ratios = calib.mask_ratio
    assert ((ratios >= 0) & (ratios <= 1)).all() and ratios.std() > 0.1  # drawn per sample
    frac = calib.masked.float().mean(dim=1)
    assert torch.allclose(frac, ratios, atol=1 / 64)
    assert (calib.input_ids[calib.masked] == MASK).all()
    assert torch.equal(calib.input_ids[~calib.masked], clean.input_ids[~calib.masked])  # same windows


def test_fixed_ratio(text_file):
    calib = make(text_file, masking="random", mask_ratio={"dist": "fixed", "value": 0.25})
    assert torch.equal(calib.mask_ratio, torch.full((16,), 0.25))
    assert (calib.masked.sum(dim=1) == 16).all()


def test_cache_hit_identical_without_retokenizing(text_file, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    first = make(text_file, cache, masking="random")
    assert len(list(cache.glob("*.pt"))) == 1
    calls = []
    monkeypatch.setattr(sets, "_tokenize", lambda *a: calls.append(a) or pytest.fail("re-tokenized"))
    with caplog.at_level(logging.INFO, logger="qdlm_bench.calibration"):
        second = make(text_file, cache, masking="random")
    assert not calls and "cached" in caplog.text
    for f in ("input_ids", "masked", "mask_ratio"):
        assert torch.equal(getattr(first, f), getattr(second, f))
    assert first.key == second.key


def test_cache_key_changes(text_file, tmp_path):
    base = {"source": str(text_file), "n_samples": 16, "seqlen": 64}

    def key(tok=TOK, mask=MASK, **kw):
        cfg = CalibConfig.from_dict({**base, **kw})
        return cache_key(cfg, tok, mask, source_texts(cfg))

    k = key()
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text() + "more")
    variants = [key(n_samples=8), key(seqlen=32), key(seed=1), key(masking="random"),
                key(source=str(other)), key(mask=MASK + 1),
                key(masking="random", mask_ratio={"dist": "fixed", "value": 0.5}),
                key(source="prompts:mini_math"), key(source="prompts:mini_math", chat_template=True)]
    assert k not in variants and len(set(variants)) == len(variants)
    assert key(mask_ratio={"dist": "fixed", "value": 0.5}) == k  # mask_ratio is inert without masking
    assert key(chat_template=True) == k  # so is chat_template for a text source
    text_file.write_text(text_file.read_text() + "edit")       # the source's content is part of the key
    assert key() != k


def test_jsonl_source(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"document {i} " * 20}) for i in range(10)))
    calib = make(path, text_field="body")
    assert calib.input_ids.shape == (16, 64)
    with pytest.raises(ValueError, match="no field 'text'"):
        make(path)


def test_mini_ppl_source_with_tiny_tokenizer():
    from qdlm_bench.models.checkpoint import load_tokenizer
    tok = load_tokenizer(ZOO_DIR / "tiny-llada-instruct")
    calib = build({"source": "mini_ppl", "n_samples": 32, "seqlen": 256}, tok, 1, cache_dir=None)
    assert calib.input_ids.shape == (32, 256) and int(calib.input_ids.max()) < len(tok)


def test_errors_are_clear(text_file, tmp_path):
    with pytest.raises(ValueError, match=r"unknown calib keys \['nsamples'\].*valid keys.*n_samples"):
        CalibConfig.from_dict({"nsamples": 4})
    with pytest.raises(ValueError, match="masking"):
        CalibConfig(masking="trajectory")
    with pytest.raises(ValueError, match="mask_ratio"):
        CalibConfig(mask_ratio={"dist": "fixed"})
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*calib\.source"):
        make(missing)
    with pytest.raises(FileNotFoundError, match=r"eval\.data_dir.*calib\.source"):
        build({"source": "wikitext2"}, TOK, MASK, data_dir=tmp_path, cache_dir=None)
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(ValueError, match=r"only 16 tokens.*seqlen <= 16"):
        make(short)


def test_hydra_merge_leftovers_dropped():
    cfg = CalibConfig(masking="random", mask_ratio={"dist": "fixed", "low": 0.0, "high": 1.0, "value": 0.5})
    assert cfg.mask_ratio == {"dist": "fixed", "value": 0.5}


def test_real_wikitext2(tmp_path):
    from qdlm_bench.evaluation import default_data_dir
    data_dir = default_data_dir()
    if not (data_dir / calibration.DATA_SOURCES["wikitext2"]).is_file():
        pytest.skip(f"offline WikiText-2 not found under {data_dir} (set $QDLM_DATA_DIR)")
    cfg = {"source": "wikitext2", "n_samples": 8, "seqlen": 2048, "masking": "random"}
    calib = build(cfg, TOK, MASK, cache_dir=tmp_path)
    assert calib.input_ids.shape == (8, 2048)
    assert resolve_source(CalibConfig.from_dict(cfg)).name == "wiki.test.raw.reconstructed"
    assert torch.equal(build(cfg, TOK, MASK, cache_dir=tmp_path).input_ids, calib.input_ids)


# --- prompt sources -------------------------------------------------------------------------------

def decode(row, attn) -> str:
    return "".join(map(chr, row[attn.bool()].tolist()))  # the byte tokenizer: one id per character


def test_prompts_source_left_pads_distinct_task_prompts():
    prompts = task_prompts(["mini_math", "mini_code"])  # their training splits, 200 rows each
    assert len(prompts) == 400 and prompts[0].startswith("Question: ") and prompts[0].endswith("\nAnswer:")
    assert any(p.startswith("def ") for p in prompts)
    calib = build({"source": "prompts:mini_math+mini_code", "n_samples": 12, "seqlen": 512}, TOK, MASK, cache_dir=None)
    attn = calib.attention_mask
    lengths = attn.sum(1)
    assert calib.input_ids.shape == (12, int(lengths.max())) and not calib.masked.any()
    for row, a, n in zip(calib.input_ids, attn, lengths.tolist()):
        assert a.tolist() == [0] * (len(a) - n) + [1] * n  # left padding
    rows = [decode(r, a) for r, a in zip(calib.input_ids, attn)]
    assert set(rows) <= set(prompts) and len(set(rows)) == 12  # whole, distinct prompts
    short = build({"source": "prompts:mini_math+mini_code", "n_samples": 12, "seqlen": 30}, TOK, MASK, cache_dir=None)
    assert short.attention_mask is None  # every prompt is longer than 30: no padding
    for r, full in zip(short.input_ids, rows):  # the same draw, each prompt cut to its end
        assert decode(r, torch.ones_like(r)) == full[-30:]


def test_prompts_random_masking_spares_padding():
    cfg = {"source": "prompts:mini_math", "n_samples": 16, "seqlen": 512, "masking": "random"}
    calib = build(cfg, TOK, MASK, cache_dir=None)
    real = calib.attention_mask.bool()
    assert not (calib.masked & ~real).any() and (calib.input_ids[calib.masked] == MASK).all()
    assert torch.equal(calib.masked.sum(1), (calib.mask_ratio * real.sum(1)).round().long())


def test_prompts_with_chat_template():
    from qdlm_bench.models.checkpoint import load_tokenizer
    tok = load_tokenizer(ZOO_DIR / "tiny-llada-instruct")
    cfg = {"source": "prompts:mini_math", "n_samples": 4, "seqlen": 512, "chat_template": True}
    calib = build(cfg, tok, 1, cache_dir=None)
    for row, a in zip(calib.input_ids, calib.attention_mask):
        text = tok.decode(row[a.bool()])
        assert text.startswith("<|user|>\nQuestion: ") and text.endswith("Answer:\n<|assistant|>\n"), text


def test_prompts_errors(monkeypatch):
    from qdlm_bench.evaluation import tasks
    with pytest.raises(ValueError, match="prompts:<task>"):
        CalibConfig(source="prompts:mini_math+")
    monkeypatch.setattr(tasks, "lm_eval_tasks", lambda: SimpleNamespace(all_tasks=[]))  # lm-eval's index: slow
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        build({"source": "prompts:nope"}, TOK, MASK, cache_dir=None)
    with pytest.raises(ValueError, match=r"200 prompts.*n_samples <= 200"):
        build({"source": "prompts:mini_math", "n_samples": 201}, TOK, MASK, cache_dir=None)


def test_optional_fields_travel_and_cache(tmp_path):
    cfg = {"source": "prompts:mini_math", "n_samples": 5, "seqlen": 512, "masking": "random"}
    first = build(cfg, TOK, MASK, cache_dir=tmp_path)
    second = build(cfg, TOK, MASK, cache_dir=tmp_path)
    assert set(second.tensors()) == {"input_ids", "masked", "mask_ratio", "attention_mask"}
    assert all(torch.equal(t, second.tensors()[n]) for n, t in first.tensors().items())
    full = CalibSet(**first.tensors(), confidence=torch.rand(5, first.input_ids.shape[1]),
                    token_weights=torch.rand(5, first.input_ids.shape[1]))
    parts = list(full.to("cpu").batches(2))
    assert [len(p) for p in parts] == [2, 2, 1]
    for name, t in full.tensors().items():
        assert torch.equal(torch.cat([p.tensors()[name] for p in parts]), t), name


def test_confidences():
    model = random_model("tiny-llada").eval()
    calib = build({"source": "prompts:mini_math", "n_samples": 4, "seqlen": 40, "masking": "random"},
                  TOK, model.config.mask_token_id, cache_dir=None)
    conf = confidences(model, calib, batch_size=3)
    with torch.no_grad():
        logits = model(calib.input_ids, attention_mask=calib.attention_mask)
    probs = logits.softmax(-1)
    best = probs.index_fill(-1, torch.tensor(model.config.mask_token_id), 0).amax(-1)  # the mask token's share kept
    m = calib.masked
    assert m.any() and (~m).any()
    assert torch.allclose(conf[m], best[m], atol=1e-6)
    assert torch.allclose(conf[~m], probs.gather(-1, calib.input_ids[..., None]).squeeze(-1)[~m], atol=1e-6)
