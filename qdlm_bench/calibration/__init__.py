"""Calibration sets: a text corpus -> ``n_samples`` random token windows of ``seqlen``, optionally
masked; or task prompts -> ``n_samples`` left-padded prompts.

    cfg = CalibConfig.from_dict({"source": "wikitext2", "n_samples": 128, "seqlen": 2048})
    calib = build(cfg, tokenizer, mask_token_id=model.config.mask_token_id)
    for batch in calib.to(device).batches(8): model(batch.input_ids, batch.attention_mask)

Sources: ``wikitext2`` (the study calibrates on the WikiText-2 *train* split, which is not
available offline; we use the raw *test* split in ``<data_dir>/wikitext2``, so calibration and
wikitext perplexity share text), ``tinyshakespeare``, ``mini_ppl`` (the tiny zoo models'
held-out text, ``tasks/mini/mini_ppl.jsonl``; it is also the ``mini_ppl`` eval set), or a path
to any local ``.txt`` / ``.jsonl`` file (field ``text_field``). As in GPTQ's ``get_wikitext2``,
the whole text is tokenized once (no special tokens added) and windows start at seeded random
positions. Masking ``random`` replaces round(t * n) of the n tokens of each sample with the
model's mask token, t drawn per sample from ``mask_ratio``. Results are cached on disk under a
hash of everything that defines them (see ``cache_key``).

``prompts:<task>[+<task>...]`` (e.g. ``prompts:mini_math+mini_code``, ``prompts:gsm8k_local``) reads
the prompts (``doc_to_text``, zero-shot, never the answers) of project or lm-eval tasks: from a
task's training split when it has one, else from its evaluation documents (then the prompts of
evaluated items; only their answers stay unseen). ``n_samples`` distinct prompts are drawn at
random; each is encoded as the evaluation adapter encodes prompts (with ``chat_template``, first
wrapped as a user turn), keeps its last ``seqlen`` tokens and is left-padded (``attention_mask``).
Random masking spares the padding. Prompt sets are clean-text calibration for any method
and the prompts of DLLMQuant's TMAS trajectories (``qdlm_bench.methods.dllmquant.tmas``).

Modules: ``config`` (``CalibConfig``, the ``calib`` group's schema; no torch), ``sources`` (the only
module that reads the zoo's text and lm-eval tasks), ``sets`` (``CalibSet``, ``build``, the cache,
masking, ``confidences``). Importing this package loads ``config`` only; every other name loads its
module on first use.
"""

from qdlm_bench.lazy import lazy_exports

from .config import MASK_DISTS as MASK_DISTS, PROMPTS_PREFIX as PROMPTS_PREFIX, CalibConfig as CalibConfig

_EXPORTS = {
    ".sources": ["DATA_SOURCES", "check", "GENERATED_SOURCES", "PROJECT_SOURCES", "read_text", "resolve_source",
                 "source_texts", "task_prompts"],
    ".sets": ["CACHE_VERSION", "CalibSet", "apply_masking", "build", "cache_key", "confidences", "draw_ratios",
              "encode_prompt", "load", "sample_prompts", "sample_windows", "save", "tokenizer_fingerprint"],
}
__getattr__ = lazy_exports(__name__, {name: module for module, names in _EXPORTS.items() for name in names})
__all__ = sorted(["CalibConfig", "MASK_DISTS", "PROMPTS_PREFIX", *(n for names in _EXPORTS.values() for n in names)])
