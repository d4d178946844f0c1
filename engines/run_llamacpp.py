"""llama.cpp (llama-cpp-python) on a GGUF export: prompt log-probabilities. Runs in the llama.cpp virtualenv.

python run_llamacpp.py JOB.json OUT.json   (JOB/OUT as in run_vllm.py; a run has "gguf" and "n_ctx")
"""

import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> None:
    job = json.load(open(sys.argv[1]))
    ids = job["ids"]
    result = {}
    for run in job["runs"]:
        start = time.perf_counter()
        n_ctx = run["n_ctx"]
        llm = Llama(
            model_path=run["gguf"],
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            logits_all=True,
            n_threads=int(job.get("threads", 2)),
            verbose=False,
            **({"type_k": 0, "type_v": 0} if run.get("kv") == "f32" else {}),  # GGML_TYPE_F32; default f16
        )
        weights = run["gguf"].rsplit("-", 1)[-1].removesuffix(".gguf")
        entry = {
            "dtype": f"{weights}, KV {run.get('kv', 'f16')}",
            "load_s": time.perf_counter() - start,
            "n_ctx": llm.n_ctx(),
            "lengths": {},
        }
        for n in run["lengths"]:
            t0 = time.perf_counter()
            llm.reset()
            llm.eval(ids[:n])
            logp = log_softmax(np.asarray(llm.scores[: n - 1]))
            lp = logp[np.arange(n - 1), ids[1:n]]
            entry["lengths"][str(n)] = {
                "lp": lp.tolist(),
                "top": logp.argmax(-1).tolist(),
                "s": time.perf_counter() - t0,
            }
        result[run["name"]] = entry
        llm.close()
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
