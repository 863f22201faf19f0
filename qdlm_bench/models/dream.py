"""Dream (Dream-org/Dream-v0-*-7B, Qwen2 layout): its config.json fields and key names."""

from __future__ import annotations

from .config import DLLMConfig

# Our module names -> Qwen2's names; parameters keep their suffix (.weight / .bias).
TOP = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
BLOCK_PREFIX = "model.layers.{i}."
BLOCK = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj",
         "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
         "mlp_norm": "post_attention_layernorm", "gate_proj": "mlp.gate_proj",
         "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}

# Fields of the real config.json that do not vary with the architecture.
FIXED = {
    "architectures": ["DreamModel"], "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                 "AutoModel": "modeling_dream.DreamModel"},
    "hidden_act": "silu", "initializer_range": 0.02, "model_type": "Dream", "rope_scaling": None,
    "sliding_window": None, "use_cache": True, "use_sliding_window": False,
}


def matches(hf: dict) -> bool:
    return str(hf.get("model_type", "")).lower() == "dream" or "DreamModel" in (
        hf.get("architectures") or [])


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests it
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        raise ValueError(f"unsupported Dream rope scaling {scaling}; only default RoPE is implemented")
    return float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def config_from_hf(hf: dict) -> DLLMConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported Dream activation {hf['hidden_act']!r}; expected 'silu'")
    if "mask_token_id" not in hf:
        raise ValueError("Dream config.json has no mask_token_id")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // h):
        raise ValueError(f"unsupported head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return DLLMConfig(
        family="dream", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
        n_heads=h, n_kv_heads=hf.get("num_key_value_heads") or h, d_ff=hf["intermediate_size"],
        rope_theta=_rope_theta(hf), norm_eps=hf.get("rms_norm_eps", 1e-6), qkv_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), shift_logits=True,
        max_seq_len=hf.get("max_position_embeddings", 4096), mask_token_id=hf["mask_token_id"],
        eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"))


def config_to_hf(cfg: DLLMConfig) -> dict:
    """The real config.json fields for ``cfg`` (its ``extra`` is applied by the caller)."""
    if not (cfg.qkv_bias and cfg.shift_logits):
        raise ValueError("a Dream config needs qkv_bias=True and shift_logits=True")
    return {**FIXED,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "num_hidden_layers": cfg.n_layers, "max_window_layers": cfg.n_layers,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_seq_len, "mask_token_id": cfg.mask_token_id,
            "pad_token_id": cfg.pad_token_id,
            "bos_token_id": cfg.eos_token_id,  # Dream's bos is its eos; a differing one stays in extra
            "eos_token_id": cfg.eos_token_id}
