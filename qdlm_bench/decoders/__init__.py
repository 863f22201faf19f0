"""Fast decoders of masked-diffusion LMs (the ``decode`` axis): Fast-dLLM's block-wise approximate
KV caches (``prefix``, ``dual``) and confidence-threshold parallel decoding.

``config`` (torch-free, read by the configuration check) says which decoder a run uses;
``samplers`` holds the decoding loops; ``counting`` counts forward passes and their FLOPs.
"""
