"""dLLM model code: one transformer, LLaDA and Dream checkpoint layouts, presets."""

from .checkpoint import ModelNotFoundError, load_model, save_model
from .config import DLLMConfig
from .presets import SHAPES, random_model
from .transformer import LINEAR_NAMES, DiffusionLM

__all__ = ["DLLMConfig", "DiffusionLM", "LINEAR_NAMES", "ModelNotFoundError", "SHAPES",
           "load_model", "random_model", "save_model"]
