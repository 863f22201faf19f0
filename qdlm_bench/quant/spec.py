"""QuantSpec: what to quantize and how, parsed from bit strings such as ``"w4a16g128"``.

Grammar: ``fp16 | bf16 | fp`` (no quantization) or ``w{2..8}a{4,8,16}[g{group}][_sym|_asym][kv{2..8}]``.
The ``_sym`` / ``_asym`` suffix is about weights. Defaults, following common practice:

* weights: asymmetric for weight-only specs (GPTQ/AWQ), symmetric when activations are
  quantized too (SmoothQuant/QuaRot); ``group_size=None`` means one scale per output channel;
* activations: per-token dynamic, asymmetric (``a_sym=False``), no clipping (``a_clip_ratio=1``),
  on the inputs of the linears named in ``act_layers`` (default: all seven of every block);
* KV cache: 16 bits unless ``kv{bits}`` is given (per-token per-head, asymmetric, K after RoPE);
  attention probabilities always stay in the model's dtype;
* grids (``GRIDS``, ``quant.quantizer``): each method passes its reference's weight grid; ``a_grid``
  is the activation and KV quantizers' (``"absmax"``; a method whose reference differs sets it
  on the spec, as DuQuant does: the method determines it, so it is no run option).

``name`` is the canonical bit string; it encodes every grammar field (the sym suffix only when
it differs from the default) and re-parses to the same spec. ``a_sym``, ``a_clip_ratio``,
``act_layers`` and the layer targets (``exclude``: fnmatch patterns of linears kept in full
precision; ``lm_head``: quantize the LM head too) are keyword options only: they are recorded with
the run's quant config, not in the name; bad values raise a plain ``ValueError`` naming the option.
Torch-free: the configuration check parses specs without loading torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from qdlm_bench.models.config import LINEAR_NAMES

VALID_FORMS = (
    "fp16 | bf16 | fp (no quantization), or w{2-8}a{4,8,16}[g{group}][_sym|_asym][kv{2-8}], "
    "e.g. w4a16, w4a16g128, w3a16g128_sym, w4a16g64_asym, w8a8, w4a8, w4a4, w4a4kv4"
)
FP_NAMES = ("fp", "fp16", "bf16")
_PATTERN = re.compile(r"w(\d+)a(\d+)(?:g(\d+))?(?:_(sym|asym))?(?:kv(\d+))?")
_LOW_BITS = range(2, 9)
_A_BITS = (4, 8, 16)
ACT_LAYER_NAMES = (*LINEAR_NAMES, "lm_head")  # lm_head counts only where a method quantizes it
GRIDS = ("absmax", "gptq", "duquant")  # the quantizer's grids (quant.quantizer)


class QuantSpecError(ValueError):
    """A bad spec; the message names the input, the reason and the valid forms."""

    def __init__(self, text: str, why: str):
        super().__init__(f"invalid quantization spec {text!r}: {why}. Valid forms: {VALID_FORMS}")
        self.why = why


@dataclass(frozen=True)
class QuantSpec:
    """Bit widths and quantizer options of one run; 16 bits means "not quantized"."""

    w_bits: int = 16
    a_bits: int = 16
    group_size: int | None = None  # None (or -1) = per output channel
    w_sym: bool | None = None  # None -> default: asym weight-only, sym when a_bits < 16
    a_sym: bool = False
    a_clip_ratio: float = 1.0
    a_grid: str = "absmax"  # grid of the activation and KV quantizers
    kv_bits: int = 16
    act_layers: tuple[str, ...] = LINEAR_NAMES  # linears (short names) whose inputs are quantized
    exclude: tuple[str, ...] = ()  # fnmatch patterns of full linear names (blocks.3.q_proj) left in FP
    lm_head: bool = False  # quantize the LM head too (embeddings always stay in full precision)

    def __post_init__(self):
        if self.group_size == -1:
            object.__setattr__(self, "group_size", None)
        if self.w_sym is None:
            object.__setattr__(self, "w_sym", self.a_bits < 16)
        why = self._problem()
        if why:
            raise QuantSpecError(repr(self), why)
        self._check_options()

    def _check_options(self) -> None:
        if not isinstance(self.a_sym, bool):
            raise ValueError(f"a_sym must be true or false, got {self.a_sym!r}")
        ratio, layers = self.a_clip_ratio, self.act_layers
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"a_clip_ratio must be a number in (0, 1], got {ratio!r}")
        if self.a_grid not in GRIDS:
            raise ValueError(f"a_grid must be one of {', '.join(GRIDS)}, got {self.a_grid!r}")
        if isinstance(layers, str) or not all(isinstance(n, str) for n in layers) or not layers:
            raise ValueError(f"act_layers must be a non-empty list of linear names, got {layers!r}")
        unknown = sorted(set(layers) - set(ACT_LAYER_NAMES))
        if unknown:
            raise ValueError(f"act_layers has unknown name(s) {unknown}; valid: {', '.join(ACT_LAYER_NAMES)}")
        object.__setattr__(self, "act_layers", tuple(n for n in ACT_LAYER_NAMES if n in layers))
        object.__setattr__(self, "a_clip_ratio", float(ratio))
        if isinstance(self.exclude, str) or not all(isinstance(p, str) for p in self.exclude):
            raise ValueError(f"exclude must be a list of fnmatch patterns of linear names, got {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if not isinstance(self.lm_head, bool):
            raise ValueError(f"lm_head must be true or false, got {self.lm_head!r}")

    def _problem(self) -> str | None:
        if self.w_bits == 16:
            if self.kv_bits != 16:  # the K/V quantizers are installed only by a method that quantizes weights
                return (f"kv{self.kv_bits} with 16-bit weights: no method installs K/V quantizers on a "
                        "full-precision model; quantize the weights too (e.g. w8a8kv4) or drop the kv part")
            fp = (self.a_bits, self.group_size) == (16, None)
            return None if fp else "16-bit weights with quantized activations or groups"
        if self.w_bits not in _LOW_BITS:
            return f"w_bits must be 2..8 (or 16 = none), got {self.w_bits}"
        if self.a_bits not in _A_BITS:
            return f"a_bits must be one of {_A_BITS}, got {self.a_bits}"
        if self.kv_bits != 16 and self.kv_bits not in _LOW_BITS:
            return f"kv_bits must be 2..8 (or 16 = none), got {self.kv_bits}"
        if self.group_size is not None and self.group_size <= 0:
            return f"group size must be positive (or -1 = per channel), got {self.group_size}"
        return None

    @classmethod
    def parse(cls, text: str, **overrides) -> QuantSpec:
        """Parse a bit string; keyword ``overrides`` (any field) win over the string and defaults."""
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown QuantSpec option(s) {sorted(unknown)}")
        s = str(text).strip().lower()
        parsed = {}
        if s not in FP_NAMES:
            m = _PATTERN.fullmatch(s)
            if m is None:
                raise QuantSpecError(text, "unrecognised form")
            w, a, g, sym, kv = m.groups()
            parsed = dict(w_bits=int(w), a_bits=int(a), kv_bits=int(kv) if kv else 16)
            if g is not None:
                parsed["group_size"] = int(g)
            if sym is not None:
                parsed["w_sym"] = sym == "sym"
        try:
            return cls(**{**parsed, **overrides})
        except QuantSpecError as e:
            raise QuantSpecError(text, e.why) from None

    @property
    def is_fp(self) -> bool:
        return self.w_bits == 16

    @property
    def weight_only(self) -> bool:
        return not self.is_fp and self.a_bits == 16 and self.kv_bits == 16

    def quantizes_input(self, linear: str) -> bool:
        """Whether the input of ``linear`` (``"q_proj"`` or a full name ``"blocks.3.q_proj"``) is quantized."""
        return self.a_bits < 16 and linear.rsplit(".", 1)[-1] in self.act_layers

    def grammar_fields(self) -> dict:
        """The parsed grammar fields (records store them, so reports never re-parse ``name``)."""
        return {"w_bits": self.w_bits, "a_bits": self.a_bits, "group_size": self.group_size,
                "w_sym": self.w_sym, "kv_bits": self.kv_bits}

    @property
    def name(self) -> str:
        if self.is_fp:
            return "fp"
        s = f"w{self.w_bits}a{self.a_bits}"
        if self.group_size is not None:
            s += f"g{self.group_size}"
        if self.w_sym != (self.a_bits < 16):
            s += "_sym" if self.w_sym else "_asym"
        if self.kv_bits != 16:
            s += f"kv{self.kv_bits}"
        return s

    def __str__(self) -> str:
        return self.name
