"""LLaDA (GSAI-ML/LLaDA-8B-*): its config.json fields and its checkpoint key names."""

from __future__ import annotations

from .config import DLLMConfig

# Our module names -> LLaDA's (OLMo-style) names; parameters keep their suffix (.weight / .bias).
TOP = {"embed": "model.transformer.wte", "norm": "model.transformer.ln_f",
       "lm_head": "model.transformer.ff_out"}
BLOCK_PREFIX = "model.transformer.blocks.{i}."
BLOCK = {"attn_norm": "attn_norm", "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj",
         "o_proj": "attn_out", "mlp_norm": "ff_norm", "gate_proj": "ff_proj", "up_proj": "up_proj",
         "down_proj": "ff_out"}

# Fields of the real config.json that do not vary with the architecture.
FIXED = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
    "embedding_dropout": 0.0, "flash_attention": False, "include_bias": False,
    "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
    "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rope": True, "rope_full_precision": True, "scale_logits": False,
    "use_cache": False,
}
# Settings our transformer does not implement; a config asking for them is refused.
REQUIRED = {"activation_type": "silu", "alibi": False, "attention_layer_norm": False,
            "block_type": "llama", "include_bias": False, "layer_norm_type": "rms", "rope": True,
            "scale_logits": False, "input_emb_norm": False}


def matches(hf: dict) -> bool:
    return str(hf.get("model_type", "")).lower() == "llada" or any(
        a.startswith("LLaDA") for a in hf.get("architectures") or [])


def config_from_hf(hf: dict) -> DLLMConfig:
    bad = {k: hf[k] for k, v in REQUIRED.items() if k in hf and hf[k] != v}
    if bad:
        raise ValueError(f"unsupported LLaDA config settings {bad}; supported: {REQUIRED}")
    if "mask_token_id" not in hf:
        raise ValueError("LLaDA config.json has no mask_token_id")
    d = hf["d_model"]
    return DLLMConfig(
        family="llada", vocab_size=hf.get("embedding_size") or hf["vocab_size"], d_model=d,
        n_layers=hf["n_layers"], n_heads=hf["n_heads"],
        n_kv_heads=hf.get("n_kv_heads") or hf["n_heads"],
        d_ff=hf.get("mlp_hidden_size") or hf.get("mlp_ratio", 4) * d,
        rope_theta=float(hf.get("rope_theta", 10000.0)), norm_eps=hf.get("rms_norm_eps", 1e-5),
        qkv_bias=bool(hf.get("include_qkv_bias", False)),
        tie_embeddings=bool(hf.get("weight_tying", False)), shift_logits=False,
        max_seq_len=hf.get("max_sequence_length", 4096), mask_token_id=hf["mask_token_id"],
        eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"))


def config_to_hf(cfg: DLLMConfig) -> dict:
    """The real config.json fields for ``cfg`` (its ``extra`` is applied by the caller)."""
    if cfg.shift_logits:
        raise ValueError("a LLaDA config cannot have shift_logits=True")
    return {**FIXED,
            "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "n_kv_heads": cfg.n_kv_heads, "mlp_hidden_size": cfg.d_ff,
            "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
            "include_qkv_bias": cfg.qkv_bias, "weight_tying": cfg.tie_embeddings,
            "vocab_size": cfg.vocab_size, "embedding_size": cfg.vocab_size,
            "max_sequence_length": cfg.max_seq_len, "mask_token_id": cfg.mask_token_id,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
