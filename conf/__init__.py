"""Hydra configs, installed as package data (``qdlm_bench.conf``)."""
