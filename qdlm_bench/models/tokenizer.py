"""A byte-level tokenizer for random-weight models: no files, no network, any text round-trips.

Ids 0-255 are the bytes; then the special tokens in ``SPECIAL_TOKENS`` order:
``<|endoftext|>`` (eos and pad), ``<|mask|>`` (the diffusion mask), and the chat role markers
``<|system|>``, ``<|user|>``, ``<|assistant|>``. ``len(tokenizer)`` is the vocabulary size a
matching random model needs.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS, MASK = "<|endoftext|>", "<|mask|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (EOS, MASK, *ROLES)

# <|role|>\ncontent<|endoftext|> per message; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|endoftext|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer (vocabulary of ``256 + len(SPECIAL_TOKENS)``) with a chat template."""
    tok = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, mask_token=MASK,
        additional_special_tokens=list(ROLES), chat_template=CHAT_TEMPLATE,
        name_or_path="qdlm-byte",
    )


def _byte_vocab() -> dict[str, int]:
    """GPT-2's byte-level alphabet (a printable character per byte) -> the byte value as id."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = (b for b in range(256) if b not in printable)
    vocab = {chr(b): b for b in printable}
    vocab.update({chr(256 + i): b for i, b in enumerate(others)})
    return vocab
