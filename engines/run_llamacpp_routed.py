"""CLEX served by stock llama.cpp (llama-cpp-python), routed by length: one process, one loaded model, two contexts.

python run_llamacpp_routed.py JOB.json OUT.json        (runs in the llama.cpp virtualenv)

JOB: {"L", "T", "threads", "kv": "f32"|"f16", "gguf": the export at factor T,
      "per_t": {"t": the export at factor t} (optional), "ids": [...], "requests": [{"n", "max_tokens"}],
      "generate": [{"n", "max_tokens"}], "suppress": [token ids never generated, e.g. the end-of-text ids]}
OUT: {"load_s", "shared_model", "models", "contexts": {t: n_ctx}, "factors": {t: "short"|"long"},
      "requests": [{"n", "max_tokens", "t_req", "served_t", "lp", "top", "s"} | {"n", "max_tokens", "error"}],
      "generate": [{"n", "max_tokens", "t_req", "served_t", "tokens", "s"}]}

llama.cpp picks RoPE factors per context, never per sequence (llama_model::get_rope_factors): rope_factors_long
when the context's n_ctx_seq > the GGUF's rope.scaling.original_context_length (= L), else rope_factors_short.
A GGUF exported at factor T holds θ(1) as its short and θ(T) as its long factors, so one llama_model serves
t = 1 through a context of n_ctx = L and t = T through one of n_ctx = T·L. A request needing t_req = ⌈(n + max_tokens)
/ L⌉ strictly between goes to a model+context loaded from the per-t GGUF for t_req if given (θ(t) as its long
factors), else to the t = T context (CLEX would use θ(t_req) there: the known mismatch). Past T·L it is refused.
Requests run one at a time, each on a cleared KV memory; generation is greedy and runs exactly max_tokens tokens
(the ids in "suppress" are never chosen).
llama.cpp pads n_ctx to a multiple of 256: for an L that is not one, the models are loaded with
original_context_length overridden to the padded L (a load-time key override, no patch), else the t = 1 context
would silently get θ(T); a context that would still get the wrong set (L <= 128) stops the run.
"""

import ctypes
import json
import math
import sys
import time

import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp._logger import set_verbose


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


ARCHS = ("llama", "phi3")  # what clex export --to gguf writes (clex.export_gguf.GGUF_ARCHS)


class Server:
    def __init__(self, job: dict):
        self.L, self.T = int(job["L"]), int(job["T"])
        self.threads = int(job.get("threads", 2))
        self.suppress = [int(i) for i in job.get("suppress", [])]  # ids never generated (the model's end ids)
        self.kv_f32 = job.get("kv", "f16") == "f32"
        # llama.cpp pads n_ctx up to a multiple of 256 (llama_context's constructor), so the t = 1 context has
        # n_ctx_seq = switch >= L; it keeps the short factors only if the switch point is moved there (see load)
        self.switch = -(-self.L // 256) * 256
        llama_cpp.llama_backend_init()
        main = self.load(job["gguf"])  # the one llama_model behind t = 1 and t = T
        self.ctx = {t: self.context(main, t) for t in sorted({1, self.T})}
        for t, path in sorted((int(t), p) for t, p in job.get("per_t", {}).items()):
            if 1 < t < self.T:  # a model of its own: its long factors are θ(t)
                self.ctx[t] = self.context(self.load(path), t)
        self.models = {t: llama_cpp.llama_get_model(c.ctx) for t, c in self.ctx.items()}  # llama_model pointers
        self.shared = self.models[1] == self.models[self.T] == main.model
        self.batch = _internals.LlamaBatch(n_tokens=self.T * self.L, embd=0, n_seq_max=1, verbose=False)

    def close(self) -> None:
        for ctx in self.ctx.values():
            ctx.model.close()  # frees the model's contexts first (each registered itself with its model)
        self.batch.close()

    def load(self, path: str) -> _internals.LlamaModel:
        params = _internals.LlamaModel.default_params()
        if self.switch != self.L:
            # get_rope_factors compares n_ctx_seq with rope.scaling.original_context_length (L): override it, at
            # load, with the padded L so that the t = 1 context stays short. The key serves nothing else here
            # (longrope: ext_factor = 0, no YaRN); the other architectures' keys are ignored by llama.cpp.
            over = (llama_cpp.llama_model_kv_override * (len(ARCHS) + 1))()  # zeroed last entry ends the list
            for i, arch in enumerate(ARCHS):
                over[i].key = f"{arch}.rope.scaling.original_context_length".encode()
                over[i].tag, over[i].value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, self.switch
            params.kv_overrides = over
        model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
        meta = model.metadata()
        declared = int(meta.get(f"{meta.get('general.architecture')}.rope.scaling.original_context_length", -1))
        if declared != self.L:  # the file's value (overrides do not show here)
            raise SystemExit(f"{path}: rope.scaling.original_context_length is {declared}, the job's L is {self.L}")
        return model

    def context(self, model: _internals.LlamaModel, t: int) -> _internals.LlamaContext:
        params = _internals.LlamaContext.default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = t * self.L  # whole prompt in one ubatch, all logits kept
        params.n_seq_max = 1  # then n_ctx_seq = n_ctx (padded), the number get_rope_factors compares
        # as Llama(): the raw default (AUTO) turns flash attention on, which on CPU rounds through f16 (~1e-4 in lp)
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_threads = params.n_threads_batch = self.threads
        if self.kv_f32:
            params.type_k = params.type_v = 0  # GGML_TYPE_F32; default f16
        ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        ctx.factors = "long" if llama_cpp.llama_n_ctx_seq(ctx.ctx) > self.switch else "short"  # get_rope_factors' rule
        if ctx.factors != ("short" if t == 1 else "long"):  # e.g. L <= 128: t·L and L pad to the same n_ctx
            raise SystemExit(f"the t = {t} context (n_ctx {ctx.n_ctx()}) would use the {ctx.factors} factors")
        return ctx

    def route(self, n: int, max_tokens: int) -> tuple[int, int]:
        if n + max_tokens > self.T * self.L:
            raise ValueError(f"n + max_tokens = {n + max_tokens} > T·L = {self.T * self.L}")
        t_req = max(1, math.ceil((n + max_tokens) / self.L))
        return t_req, (t_req if t_req in self.ctx else self.T)

    def decode(self, ctx: _internals.LlamaContext, tokens: list[int], n_past: int) -> np.ndarray:
        """Decode tokens at positions n_past.. and return their logits, [len(tokens), n_vocab]."""
        self.batch.set_batch(tokens, n_past=n_past, logits_all=True)
        ctx.decode(self.batch)
        n_vocab = ctx.model.n_vocab()
        ptr = ctypes.cast(ctx.get_logits(), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(ptr, shape=(len(tokens), n_vocab)).copy()

    def prompt(self, ids: list[int], n: int, max_tokens: int) -> tuple[dict, np.ndarray]:
        t_req, served = self.route(n, max_tokens)
        if not 1 <= n <= len(ids):
            raise ValueError(f"n = {n} outside 1..{len(ids)}")
        ctx = self.ctx[served]
        ctx.kv_cache_clear()
        logits = self.decode(ctx, ids[:n], 0)
        return {"n": n, "max_tokens": max_tokens, "t_req": t_req, "served_t": served}, logits

    def score(self, ids: list[int], n: int, max_tokens: int) -> dict:
        start = time.perf_counter()
        entry, logits = self.prompt(ids, n, max_tokens)
        logp = log_softmax(logits[: n - 1])
        entry["lp"] = logp[np.arange(n - 1), ids[1:n]].tolist()
        entry["top"] = logp.argmax(-1).tolist()
        entry["s"] = time.perf_counter() - start
        return entry

    def generate(self, ids: list[int], n: int, max_tokens: int) -> dict:
        start = time.perf_counter()
        entry, logits = self.prompt(ids, n, max_tokens)
        ctx, tokens = self.ctx[entry["served_t"]], []
        for i in range(max_tokens):
            logits[-1, self.suppress] = -np.inf  # as min_tokens = max_tokens elsewhere: end-of-text never chosen
            tokens.append(int(logits[-1].argmax()))
            if i + 1 < max_tokens:
                logits = self.decode(ctx, tokens[-1:], n + i)
        entry["tokens"], entry["s"] = tokens, time.perf_counter() - start
        return entry


def main() -> None:
    job = json.load(open(sys.argv[1]))
    ids = job["ids"]
    set_verbose(False)
    start = time.perf_counter()
    server = Server(job)
    out = {
        "load_s": time.perf_counter() - start,
        "shared_model": bool(server.shared),
        "models": len(set(server.models.values())),  # distinct llama_models behind the contexts
        "contexts": {str(t): c.n_ctx() for t, c in sorted(server.ctx.items())},
        "factors": {str(t): c.factors for t, c in sorted(server.ctx.items())},
        "requests": [],
        "generate": [],
    }
    for kind, fn in (("requests", server.score), ("generate", server.generate)):
        for req in job.get(kind, []):
            n, m = int(req["n"]), int(req["max_tokens"])
            try:
                out[kind].append(fn(ids, n, m))
            except (ValueError, RuntimeError) as exc:
                out[kind].append({"n": n, "max_tokens": m, "error": str(exc).splitlines()[0]})
    server.close()
    json.dump(out, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
