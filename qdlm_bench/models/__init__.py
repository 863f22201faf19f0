"""dLLM model code: one transformer, LLaDA and Dream checkpoint layouts, presets (loaded on first use)."""

from qdlm_bench.lazy import lazy_exports

from .config import LINEAR_NAMES, DLLMConfig

__getattr__ = lazy_exports(__name__, {
    "ModelNotFoundError": ".checkpoint", "load_model": ".checkpoint", "save_model": ".checkpoint",
    "SHAPES": ".presets", "random_model": ".presets", "DiffusionLM": ".transformer",
})
__all__ = ["DLLMConfig", "DiffusionLM", "LINEAR_NAMES", "ModelNotFoundError", "SHAPES",
           "load_model", "random_model", "save_model"]
