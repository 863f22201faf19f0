"""The tiny models' byte-level BPE tokenizer, trained with ``tokenizers``, saved in HF format.

Special tokens come first: ``<|endoftext|>`` (0: eos and pad), ``<|mask|>`` (1), ``<|user|>``
(2), ``<|assistant|>`` (3). Pre-tokenization isolates every newline and every digit, so a prompt
ending in a newline tokenizes as it does inside running text (HumanEval prompts) and arithmetic
sees one token per digit. The chat template follows LLaDA's shape: a header per turn, the
assistant turn ends with end-of-text, ``add_generation_prompt`` opens the assistant turn.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 4096
EOS, MASK, USER, ASSISTANT = "<|endoftext|>", "<|mask|>", "<|user|>", "<|assistant|>"
SPECIAL = [EOS, MASK, USER, ASSISTANT]
CHAT_TEMPLATE = (  # newlines as expressions: HF renders templates with trim_blocks
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] | trim }}"
    "{% if m['role'] == 'assistant' %}{{ '<|endoftext|>' }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
MAX_LENGTH = 512


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the BPE on ``texts``; the result has the special tokens at ids 0-3 and the chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, mask_token=MASK,
                                   additional_special_tokens=[USER, ASSISTANT], model_max_length=MAX_LENGTH)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tokenizer, folder) -> None:
    """Save in HF format with the chat template inside tokenizer_config.json (as LLaDA ships it)."""
    tokenizer.save_pretrained(folder, save_jinja_files=False)


def encode_docs(tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one uint16 token stream, each followed by end-of-text."""
    if len(tokenizer) > 65536:
        raise ValueError("a uint16 token stream needs a vocabulary of at most 65536")
    ids = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    return np.concatenate([np.asarray(e.ids + [eos], dtype=np.uint16) for e in ids])
