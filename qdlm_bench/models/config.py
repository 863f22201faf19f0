"""One config for every dLLM family: the architecture plus the per-model diffusion tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# the canonical linear names inside every block, for every family
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DLLMConfig:
    """Architecture of a bidirectional transformer dLLM (LLaDA or Dream layout)."""

    family: str  # "llada" | "dream"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    shift_logits: bool = False  # Dream: position i is predicted by the logits of position i-1
    max_seq_len: int = 4096
    mask_token_id: int = 0
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # family-specific config.json fields kept for saving

    def __post_init__(self):
        if self.family not in ("llada", "dream"):
            raise ValueError(f"unknown model family {self.family!r}; expected 'llada' or 'dream'")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)
