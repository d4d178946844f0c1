"""Evaluations: what a method does to a model, measured against length.

``ppl`` scores perplexity on the same token windows for every method; ``tasks`` generates and scores answers
(the runner behind ``retrieval`` — passkey and needle —, ``ruler`` and ``longbench``), resuming through
``resume``; ``harness`` runs lm-evaluation-harness tasks; ``common`` checks the arguments they share and loads
the model under each method; ``metrics`` scores answers; ``report`` writes tables and plots. May import the
core, ``clex.data`` and ``clex.io``; not training, serving or the CLI.
"""
