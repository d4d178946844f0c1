"""vLLM's OpenAI server with clex's plugin: one server, every band's request sent at once. Runs in the vLLM
virtualenv.

    python run_vllm_plugin_server.py JOB.json OUT.json

JOB as in run_vllm_plugin.py ("bands", "refuse_n", "max_num_batched_tokens", "block_size"). Each band request has
max_tokens 1 and prompt_logprobs 1; all are sent concurrently, so the server batches profiles together. Then a
request is sent with ``vllm_xargs`` {"clex_t": T} (a client raising its t), and one of T·L prompt tokens (refused:
HTTP 400).
OUT: {"bands": {n: {"lp", "top"}}, "raised": {"n", "t", "lp"}, "refused": str, "load_s", "batch_s"}.
"""

import json
import sys
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor

from run_vllm_server import post, prompt_lp, serving


def main() -> None:
    job = json.load(open(sys.argv[1]))
    ids, T, L = job["ids"], job["T"], job["L"]
    flags = ["--max-model-len", str(T * L), "--dtype", job["dtype"], "--block-size", str(job["block_size"]),
             "--max-num-batched-tokens", str(job["max_num_batched_tokens"]), "--enable-chunked-prefill",
             *(["--skip-tokenizer-init"] if job.get("skip_tokenizer_init") else [])]
    with serving(job["model"], flags, sys.argv[2] + ".log") as (base, load_s):

        def complete(n: int, **extra) -> dict:
            body = {"model": job["model"], "prompt": ids[:n], "max_tokens": 1, "temperature": 0.0,
                    "prompt_logprobs": 1, **extra}
            return post(base + "/v1/completions", body)["choices"][0]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(job["bands"])) as pool:
            choices = list(pool.map(complete, job["bands"]))
        result = {"load_s": load_s, "batch_s": time.perf_counter() - t0, "bands": {}}
        for n, choice in zip(job["bands"], choices, strict=True):
            lp, top = prompt_lp(choice, ids)
            result["bands"][str(n)] = {"lp": lp, "top": top}
        n = job["bands"][0]
        result["raised"] = {"n": n, "t": T, "lp": prompt_lp(complete(n, vllm_xargs={"clex_t": T}), ids)[0]}
        try:
            complete(T * L, prompt_logprobs=None)  # the server caps max_tokens at max_model_len − prompt: only a
            # prompt of T·L tokens or more goes beyond T·L, and vLLM refuses it itself
            result["refused"] = ""
        except urllib.error.HTTPError as exc:
            result["refused"] = f"HTTP {exc.code}: {json.loads(exc.read().decode()).get('error', {}).get('message')}"
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
