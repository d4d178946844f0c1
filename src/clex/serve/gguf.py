"""``clex export --to gguf``: a CLEX model at t = T as a GGUF file llama.cpp (and ollama, LM Studio) runs.

The tensors, hyper-parameters and tokenizer follow llama.cpp's own converter (``convert_hf_to_gguf.py``,
whose names come from the ``gguf`` package's tensor map); the one part written here is CLEX's:

* ``rope_factors_long.weight`` = λ_j = θ_j / θ_j(T), CLEX's per-pair factors at T (the ``longrope``
  export's ``long_factor``); ``rope_factors_short.weight`` = θ_j / θ_j(1), CLEX at t = 1: 1 on a plain model,
  the model's own scaling on an already-scaled one (Llama 3.x);
* ``<arch>.rope.scaling.type = longrope``, ``<arch>.rope.scaling.original_context_length = L``,
  ``<arch>.context_length = T·L``, ``<arch>.rope.scaling.attn_factor`` = the cos/sin scale (1 for CLEX).

llama.cpp divides pair j's frequency by its factor (``ggml_rope_ext``'s ``freq_factors``) and picks the
long factors for the whole context when its ``n_ctx`` exceeds L, the short ones otherwise: a llama.cpp
context of n_ctx ∈ ((T−1)·L, T·L] computes what the CLEX model computes at those lengths.

Families: those whose llama.cpp graph reads per-pair factors (``llama_model::get_rope_factors``) —
Llama, Mistral and Mixtral (llama.cpp's ``llama`` architecture) and Phi-3 (``phi3``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np

from clex.errors import BadInput
from clex.io.atomic import atomic_write

# model_type → llama.cpp architecture name (gguf.MODEL_ARCH member)
GGUF_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "mixtral": "LLAMA", "phi3": "PHI3"}
GGUF_TYPES = ("f32", "f16", "q8_0")


GGUFExportError = BadInput  # the name GGUF export code raises


def _gguf():
    if importlib.util.find_spec("gguf") is None:
        raise GGUFExportError("`to` gguf needs the `gguf` package: pip install gguf")
    import gguf

    return gguf


def check_family(config) -> str:
    """The llama.cpp architecture for ``config``'s family, or a one-line refusal."""
    family = config.model_type
    if family not in GGUF_ARCHS:
        raise GGUFExportError(
            f"`to` gguf supports {sorted(GGUF_ARCHS)} (the families whose llama.cpp graph applies per-pair rope "
            f"factors); {family!r} is not one of them: use `to` longrope and serve it with vLLM or transformers"
        )
    return GGUF_ARCHS[family]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Llama q/k projections (its rope rotates adjacent pairs, HF's halves)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(model, arch_name: str):
    """(GGUF name, float32 array) for every weight, in llama.cpp's layout."""
    gguf = _gguf()
    config = model.config
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    skip = ("rotary_emb", "clex_ode")
    for key, value in model.state_dict().items():
        if any(part in key for part in skip):
            continue
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd
        data = value.detach().float().cpu().numpy()
        if key.endswith(".mlp.experts.gate_up_proj"):  # transformers' fused experts [E, 2·ff, hidden]: gate, up
            ff = data.shape[1] // 2
            yield _map(names, key[: -len("gate_up_proj")] + "gate_proj.weight", key), data[:, :ff]
            yield _map(names, key[: -len("gate_up_proj")] + "up_proj.weight", key), data[:, ff:]
            continue
        if key.endswith(".mlp.experts.down_proj"):  # [E, hidden, ff]
            yield _map(names, key + ".weight", key), data
            continue
        if arch_name == "LLAMA" and key.endswith("self_attn.q_proj.weight"):
            data = _permute(data, n_head)
        elif arch_name == "LLAMA" and key.endswith("self_attn.k_proj.weight"):
            data = _permute(data, n_kv)
        yield _map(names, key, key), data


def _map(names, key: str, original: str) -> str:
    name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GGUFExportError(f"no GGUF name for tensor {original!r}; this checkpoint's layout is not supported")
    return name


def _vocab(writer, model_dir: Path, vocab_size: int) -> None:
    """Tokenizer metadata as llama.cpp's converter writes it (byte-level BPE, or a SentencePiece-style BPE)."""
    gguf = _gguf()
    from transformers import AutoTokenizer

    tok_json = model_dir / "tokenizer.json"
    if not tok_json.is_file():
        raise GGUFExportError(f"{model_dir} has no tokenizer.json; llama.cpp needs the tokenizer in the GGUF: copy "
                              "the base model's tokenizer files into the model directory")
    spec = json.loads(tok_json.read_text(encoding="utf-8"))
    model_spec = spec.get("model") or {}
    if model_spec.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer type {model_spec.get('type')!r} is not supported for GGUF export (BPE only)")
    if model_spec.get("byte_fallback"):  # Llama-2 / Mistral style: llama.cpp's "llama" tokenizer
        vocab = gguf.LlamaHfVocab(model_dir)
        tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        return
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special or (token.startswith("<|") and token.endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)  # ids < vocab


def _model_name(model_dir: Path) -> str:
    """``general.name``: the directory's name. llama.cpp special-cases names containing "phi3"/"phi-3" and then
    looks up Phi-3's own tokens (``</s>``, ``<unk>``, ``<s>``, ``<|endoftext|>``), failing to load a model whose
    vocabulary lacks them; such a name is written without the marker."""
    name = model_dir.resolve().name
    file = model_dir / "tokenizer.json"
    vocab = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    tokens = set((vocab.get("model") or {}).get("vocab") or {}) | {t["content"] for t in vocab.get("added_tokens", [])}
    if re.search(r"phi-?3", name, re.I) and not {"</s>", "<unk>", "<s>", "<|endoftext|>"} <= tokens:
        name = re.sub(r"phi-?3", "phi_3", name, flags=re.I)
    return name


def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, found as its converter does (a hash of the ids
    of a fixed text; table from llama.cpp, ``gguf_pre.json``); ``default`` when unknown."""
    table = json.loads((Path(__file__).parent / "gguf_pre.json").read_text(encoding="utf-8"))
    ids = tokenizer.encode(table["chktxt"])
    return table["pre"].get(hashlib.sha256(str(ids).encode()).hexdigest(), "default")


def write_gguf(model, model_dir: str | Path, out: str | Path, rope: dict, outtype: str = "f32") -> Path:
    """Write ``model`` (already switched to ``longrope`` parameters ``rope``) as a GGUF file ``out``."""
    gguf = _gguf()
    if outtype not in GGUF_TYPES:
        raise GGUFExportError(f"`outtype` must be one of {GGUF_TYPES}, got {outtype!r}")
    config = model.config
    arch_name = check_family(config)
    arch = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_name)]
    model_dir, out = Path(model_dir), Path(out)
    L = int(rope["original_max_position_embeddings"])
    factor = int(rope["factor"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rot_pct = float(config.rope_parameters.get("partial_rotary_factor", 1.0) or 1.0)
    rope_dims = int(head_dim * rot_pct)
    long_factor = np.asarray(rope["long_factor"], dtype=np.float32)
    if long_factor.shape != (rope_dims // 2,):
        raise GGUFExportError(f"{len(long_factor)} rope factors for a rotary width of {rope_dims}; cannot export")
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    def fill(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_name(_model_name(model_dir))
            writer.add_block_count(config.num_hidden_layers)
            writer.add_context_length(factor * L)
            writer.add_embedding_length(config.hidden_size)
            writer.add_feed_forward_length(config.intermediate_size)
            writer.add_head_count(config.num_attention_heads)
            writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
            writer.add_layer_norm_rms_eps(config.rms_norm_eps)
            writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
            writer.add_rope_dimension_count(rope_dims)
            own_head_dim = getattr(config, "head_dim", None)
            if own_head_dim and own_head_dim != config.hidden_size // config.num_attention_heads:
                writer.add_key_length(config.head_dim)
                writer.add_value_length(config.head_dim)
            if getattr(config, "num_local_experts", None):
                writer.add_expert_count(config.num_local_experts)
                writer.add_expert_used_count(config.num_experts_per_tok)
            if arch_name == "LLAMA":
                writer.add_vocab_size(config.vocab_size)
            if arch_name == "PHI3":
                writer.add_sliding_window(0)  # Phi-3 mini/medium; llama.cpp disables Phi's SWA anyway
            writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            writer.add_rope_scaling_orig_ctx_len(L)
            writer.add_rope_scaling_attn_factors(float(rope.get("attention_factor", 1.0)))
            writer.add_file_type(ftype)
            _vocab(writer, model_dir, config.vocab_size)
            for name, data in _tensors(model, arch_name):
                _add(writer, gguf, name, data, outtype)
            writer.add_tensor("rope_factors_long.weight", long_factor)
            writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    return atomic_write(out, fill)  # a failed export leaves no partial file behind


def _add(writer, gguf, name: str, data: np.ndarray, outtype: str) -> None:
    """One tensor: 1-D tensors and norms stay f32 (as llama.cpp's converter keeps them)."""
    if outtype == "f32" or data.ndim == 1:
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        return
    if outtype == "f16":
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
        return
    qtype = gguf.GGMLQuantizationType.Q8_0
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:  # rows must split into 32-value blocks
        writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float16))
        return
    packed = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
    writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=qtype)
