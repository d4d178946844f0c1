"""clex's vLLM plugin: serve a CLEX export at each request's own t, in one vLLM instance.

Installed with clex (``pip install clex-llm``; into a separate vLLM environment ``pip install --no-deps clex-llm``),
it is loaded by vLLM through the ``vllm.general_plugins`` entry point in every vLLM process and acts only on a
model whose ``config.json`` carries ``clex_profiles`` (written by ``clex export --to longrope``); every other
model, and a CLEX export served by a vLLM without the plugin, is served as before. It imports vllm, torch and
numpy only — never clex — so it can live in vLLM's own environment. How it works: :mod:`clex_vllm.plugin`.
"""

from .profiles import CONFIG_KEY, REQUEST_KEY, ProfileError, Profiles

__all__ = ["CONFIG_KEY", "REQUEST_KEY", "ProfileError", "Profiles", "register"]


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent; vLLM calls it once per process)."""
    from .plugin import install

    install()
