"""qdlm-bench: post-training quantization studies of diffusion LLMs (LLaDA, Dream)."""

__version__ = "0.1.0"
