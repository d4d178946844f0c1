"""Serving a model outside clex's own forward: export to the formats engines read, and an interactive chat.

``export`` writes a stock ``longrope`` checkpoint (with per-t profiles for clex's vLLM plugin) or a GGUF
(``gguf``) for llama.cpp; ``chat`` is the conversation session behind ``clex chat``. May import the core,
``clex.data`` and ``clex.io``; not training, evaluation or the CLI.
"""
