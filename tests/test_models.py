"""Checkpoint loading/saving in the real LLaDA / Dream layouts, presets, and HF reference math."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qdlm_bench.models import SHAPES, ModelNotFoundError, load_model, random_model, save_model
from qdlm_bench.models.checkpoint import config_from_hf, config_to_hf, key_map
from qdlm_bench.models.presets import get_shape

FAMILIES = ["tiny-llada", "tiny-dream"]
REAL_KEY = {"llada": "model.transformer.blocks.0.attn_out.weight",
            "dream": "model.layers.0.self_attn.q_proj.bias"}


def ids(b=2, n=12, vocab=120, seed=1):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def stored_keys(folder):
    keys = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            keys.update(sf.keys())
    return keys


@pytest.mark.parametrize("shard", [None, 40_000])
@pytest.mark.parametrize("shape", FAMILIES)
def test_save_load_roundtrip(tmp_path, shape, shard):
    model = random_model(shape, seed=3)
    save_model(model, tmp_path, shard_size_bytes=shard)
    shards = sorted(tmp_path.glob("*.safetensors"))
    if shard:
        assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    else:
        assert [f.name for f in shards] == ["model.safetensors"]
    keys = stored_keys(tmp_path)
    assert REAL_KEY[model.config.family] in keys
    assert keys == set(key_map(model.config).values())

    loaded, tok = load_model(tmp_path, dtype=torch.float32)
    assert tok is None and loaded.config == model.config and loaded.dtype == torch.float32
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_llada_real_key_names_and_tied_head(tmp_path):
    model = random_model(replace(get_shape("tiny-llada"), tie_embeddings=True))
    save_model(model, tmp_path)
    keys = stored_keys(tmp_path)
    assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight",
            "model.transformer.blocks.1.ff_proj.weight", "model.transformer.blocks.1.ff_out.weight",
            "model.transformer.blocks.1.ff_norm.weight"} <= keys
    assert "model.transformer.ff_out.weight" not in keys  # tied head is not stored twice
    loaded, _ = load_model(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.embed.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids()), model(ids()))


def test_bf16_load_and_dtype_recorded(tmp_path):
    save_model(random_model("tiny-dream"), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"
    loaded, _ = load_model(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    ref = random_model("tiny-dream", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), ref.parameters()))


@pytest.mark.parametrize("shape", ["llada-8b", "dream-7b", *FAMILIES])
def test_config_roundtrip(shape):
    cfg = get_shape(shape)
    hf = config_to_hf(cfg)
    assert config_from_hf(json.loads(json.dumps(hf))) == cfg
    # a real file's unknown fields are kept and written back
    hf_real = {**hf, "transformers_version": "4.46.2", "torch_dtype": "bfloat16"}
    cfg2 = config_from_hf(hf_real)
    assert cfg2.extra == {"transformers_version": "4.46.2"}
    assert config_to_hf(cfg2) == {**hf, "transformers_version": "4.46.2"}


def test_real_config_fields():
    llada = config_to_hf(SHAPES["llada-8b"])
    assert llada["model_type"] == "llada" and llada["architectures"] == ["LLaDAModelLM"]
    assert (llada["d_model"], llada["mlp_hidden_size"], llada["embedding_size"]) == (4096, 12288, 126464)
    assert llada["weight_tying"] is False and llada["mask_token_id"] == 126336
    dream = config_to_hf(SHAPES["dream-7b"])
    assert dream["model_type"] == "Dream" and dream["architectures"] == ["DreamModel"]
    assert (dream["num_key_value_heads"], dream["intermediate_size"]) == (4, 18944)
    # embedding rows follow embedding_size when it exceeds vocab_size; vocab_size is kept
    hf = {**llada, "vocab_size": 126000}
    cfg = config_from_hf(hf)
    assert cfg.vocab_size == 126464 and config_to_hf(cfg)["vocab_size"] == 126000
    with pytest.raises(ValueError, match="alibi"):
        config_from_hf({**llada, "alibi": True})


@pytest.mark.parametrize("shape", FAMILIES)
def test_left_padding_matches_unpadded(shape):
    model = random_model(shape)
    x = ids(1, 10)
    pad = model.config.pad_token_id
    padded = torch.cat([torch.full((1, 4), pad), x], dim=1)
    mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 10)], dim=1).long()
    with torch.no_grad():
        ref, out = model(x), model(padded, attention_mask=mask)[:, 4:]
    # Dream's first real position takes the (meaningless) logits of the pad before it
    start = 1 if model.config.shift_logits else 0
    torch.testing.assert_close(out[:, start:], ref[:, start:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref[0, 1], ref[0, 2])  # positions differ: the check has teeth


def test_dream_logits_are_shifted():
    model = random_model("tiny-dream")
    x = ids()
    with torch.no_grad():
        raw = model.lm_head(model.hidden_states(x))
        out = model(x)
    assert torch.equal(out[:, 1:], raw[:, :-1]) and torch.equal(out[:, 0], raw[:, 0])
    assert not torch.allclose(out[:, 1:], raw[:, 1:])


def test_unknown_shape():
    with pytest.raises(ValueError, match="tiny-llada"):
        random_model("llada-9000")


def test_random_model_is_deterministic():
    a, b, c = random_model("tiny-llada"), random_model("tiny-llada"), random_model("tiny-llada", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.embed.weight, c.embed.weight)


def test_big_preset_builds_without_allocating():
    from qdlm_bench.models.checkpoint import empty_model

    model = empty_model(get_shape("llada-8b"), torch.bfloat16, "meta")
    n = sum(p.numel() for p in model.parameters())
    assert 7.5e9 < n < 8.5e9 and model.dtype == torch.bfloat16


def test_missing_folder_and_offline_hub_id(tmp_path):
    with pytest.raises(ModelNotFoundError, match="local"):
        load_model(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="local") as e:
        load_model("qdlm-test-org/no-such-model-xyz")
    assert "huggingface-cli download" in str(e.value) and "model.path" in str(e.value)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_missing_key_is_named(tmp_path):
    save_model(random_model("tiny-llada"), tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    tensors["model.transformer.extra.weight"] = torch.zeros(1)
    save_file(tensors, f)
    with pytest.raises(ValueError, match="blocks.1.up_proj.weight") as e:
        load_model(tmp_path)
    assert "model.transformer.extra.weight" in str(e.value)


def test_tokenizer_loaded_alongside(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "<mask>", "hello", "world"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>",
                                  mask_token="<mask>")
    save_model(random_model("tiny-llada"), tmp_path, tokenizer=tok)
    _, loaded = load_model(tmp_path)
    assert loaded is not None and loaded("hello world")["input_ids"] == [3, 4]
    assert loaded.mask_token_id == 2


# --- against the transformers reference. Given a 4-D all-True attention mask, transformers'
# causal models attend bidirectionally, so their logits must equal our un-shifted ones everywhere.

def _randomize(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():  # norms too, so swapped norm names would show
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + ("norm" in name))


def _hf_config_kwargs():
    return dict(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=False,
                max_position_embeddings=128, attn_implementation="eager")


def _compare_with_reference(ref, ours):
    x = ids(2, 9, vocab=96)
    with torch.no_grad():
        everywhere = torch.ones(2, 1, 9, 9, dtype=torch.bool)
        expected = ref(input_ids=x, attention_mask=everywhere).logits
        raw = ours.lm_head(ours.hidden_states(x))  # un-shifted network output
        torch.testing.assert_close(raw, expected, rtol=1e-4, atol=1e-4)
        causal = ref(input_ids=x).logits
        assert not torch.allclose(raw[:, :-1], causal[:, :-1], atol=1e-2)  # the mask took effect


def test_dream_matches_qwen2(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**_hf_config_kwargs(), num_key_value_heads=2, rope_theta=1e6, mask_token_id=95)
    ref = Qwen2ForCausalLM(cfg).eval()
    _randomize(ref, 5)
    ref.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path, family="dream", dtype=torch.float32)
    assert ours.config.n_kv_heads == 2 and ours.config.rope_theta == 1e6
    _compare_with_reference(ref, ours)


def test_llada_matches_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**_hf_config_kwargs(), num_key_value_heads=4, rope_theta=5e5)
    ref = LlamaForCausalLM(cfg).eval()
    _randomize(ref, 6)
    ours_cfg = replace(get_shape("tiny-llada"), vocab_size=96, d_model=32, d_ff=80, norm_eps=1e-6,
                       rope_theta=5e5, mask_token_id=95)
    # LLaDA's names written out independently of our key map (ff_proj is the SwiGLU gate)
    renames = [("model.layers.", "model.transformer.blocks."), ("model.embed_tokens", "model.transformer.wte"),
               ("model.norm", "model.transformer.ln_f"), ("lm_head", "model.transformer.ff_out"),
               ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ff_norm"),
               ("self_attn.o_proj", "attn_out"), ("self_attn.", ""), ("mlp.gate_proj", "ff_proj"),
               ("mlp.up_proj", "up_proj"), ("mlp.down_proj", "ff_out")]
    sd = {}
    for k, v in ref.state_dict().items():
        for old, new in renames:
            k = k.replace(old, new)
        sd[k] = v.contiguous()
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(ours_cfg)))
    ours, _ = load_model(tmp_path, dtype=torch.float32)
    assert ours.config == ours_cfg
    _compare_with_reference(ref, ours)
