"""Evaluations: perplexity against length (ppl)."""
