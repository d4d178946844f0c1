"""GGUF → safetensors conversion (``clex fetch``) on a tiny Llama GGUF the test writes itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf

from clex.data.fetch import FetchError, fetch, gguf_to_safetensors
from tiny import tiny_llama

gguf = pytest.importorskip("gguf")


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what byte-level BPE vocabularies hold)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k projections (transformers undoes it when reading GGUF)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, model: tf.LlamaForCausalLM) -> None:
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    tokens = [*_byte_tokens(), "th"]  # the 256 bytes and one merge
    assert len(tokens) == c.vocab_size
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["t h"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_converts_to_an_equal_safetensors_model(tmp_path):
    model = tiny_llama(vocab_size=257, max_position_embeddings=64, tie_word_embeddings=False)
    write_tiny_llama_gguf(tmp_path / "tiny.gguf", model)
    out = gguf_to_safetensors(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert (out / "model.safetensors").exists() and not list(out.glob("*.gguf"))
    converted = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 257, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    tok = tf.AutoTokenizer.from_pretrained(out)
    ids = tok("State of the Union")["input_ids"]
    assert tok.decode(ids) == "State of the Union" and 256 in ids  # "th" merged


def test_fetch_refusals(tmp_path):
    with pytest.raises(FetchError, match="unknown model"):
        fetch("gpt5", tmp_path / "x")
    with pytest.raises(FetchError, match="does not exist"):
        gguf_to_safetensors(tmp_path / "missing.gguf", tmp_path / "y")
    assert not (tmp_path / "y").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(FetchError, match="not empty"):
        gguf_to_safetensors(tmp_path / "m.gguf", tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
