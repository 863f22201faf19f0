"""Task YAMLs and their helpers, installed as package data (``qdlm_bench.tasks``)."""
