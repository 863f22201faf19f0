"""The embedded tiny dLLMs: corpus, tokenizer, skill generators, training recipe, shipped weights.

See README.md in this folder for what went into the corpus and how to rebuild the models.
"""
