"""Tiny random models for the tests (no hub, a few seconds each on CPU): one causal LM of every supported family
(``make_model``, ``FAMILIES``), and the tiny Llama whose config, model and checkpoint on disk most of the
training, evaluation and command-line tests start from (``llama_config``, ``tiny_llama``, ``save_llama``)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

import clex  # noqa: F401  (registers the rope types and the model hook)

L = 16  # max_position_embeddings of the tiny family models: the CLEX training length
VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=L,
)


def _gemma3():
    return tf.Gemma3TextConfig(
        **COMMON, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
    )


FAMILIES = {
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "mistral": lambda: tf.MistralConfig(**COMMON, sliding_window=None),
    "mixtral": lambda: tf.MixtralConfig(**COMMON, num_local_experts=2, num_experts_per_tok=1),
    "qwen2": lambda: tf.Qwen2Config(**COMMON),
    "qwen3": lambda: tf.Qwen3Config(**COMMON, head_dim=8),
    "gemma2": lambda: tf.Gemma2Config(**COMMON, head_dim=8, sliding_window=8),
    "gemma3_text": _gemma3,
    "olmo2": lambda: tf.Olmo2Config(**COMMON),
    "starcoder2": lambda: tf.Starcoder2Config(**COMMON, sliding_window=None),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        **{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}, rotary_pct=0.5
    ),
    "phi": lambda: tf.PhiConfig(**COMMON, partial_rotary_factor=0.5),
    "phi3": lambda: tf.Phi3Config(**COMMON, pad_token_id=0),
}


def make_model(family: str, attn: str = "eager", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM of ``family`` in eval mode, fp32."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    config._attn_implementation = attn
    return tf.AutoModelForCausalLM.from_config(config).eval()


def clone(model: torch.nn.Module) -> torch.nn.Module:
    """A second model with the same weights and an independent config."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    config._attn_implementation = model.config._attn_implementation
    twin = tf.AutoModelForCausalLM.from_config(config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def randomize_clex(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Give every CLEX module a random non-zero W_down (an untrained one is exactly NTK)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in clex.clex_modules(model):
            w = module.clex_ode.down_proj
            w.copy_(torch.randn(w.shape, generator=g) * scale)


def tokens(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


# --- the tiny Llama ----------------------------------------------------------------------------------------
LLAMA = dict(
    vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
)  # byte vocabulary (`tokenizer="bytes"`), L = 32; everything else is LlamaConfig's default


def llama_config(**overrides) -> tf.LlamaConfig:
    """The tiny Llama's config: :data:`LLAMA` with ``overrides`` (any other ``LlamaConfig`` argument too)."""
    return tf.LlamaConfig(**{**LLAMA, **overrides})


def tiny_llama(seed: int = 0, cls: type = tf.LlamaForCausalLM, **overrides) -> tf.LlamaForCausalLM:
    """A tiny Llama (``llama_config(**overrides)``) initialised after ``torch.manual_seed(seed)``, in eval mode,
    fp32; ``cls``: a subclass of ``LlamaForCausalLM`` to build instead."""
    torch.manual_seed(seed)
    return cls(llama_config(**overrides)).eval()


def save_llama(path: str | Path, seed: int = 0, **overrides) -> Path:
    """``tiny_llama(seed, **overrides)`` saved with ``save_pretrained`` into ``path`` (config and weights, no
    tokenizer: the tests read it with ``tokenizer="bytes"`` or save one beside it); returns ``path``."""
    tiny_llama(seed, **overrides).save_pretrained(path)
    return Path(path)
