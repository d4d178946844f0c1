"""One vLLM instance serving a CLEX export at each request's own t through clex's plugin (``clex_vllm``). Runs in
the vLLM virtualenv, where the plugin is installed; never imports clex.

    python run_vllm_plugin.py JOB.json OUT.json

JOB: {"model", "ids", "L", "T", "dtype", "block_size", "max_num_batched_tokens" (small: long prompts are
chunked), "num_blocks" (small: concurrent requests are preempted), "bands": [n, ...] (prompt log-probs,
max_tokens 1), "generate": [{"n", "max_tokens"}] (greedy), "preempt": [{"start", "n", "max_tokens"}] (greedy, prompts
ids[start : start + n], together more than the KV cache holds), "cache_ids" (a prompt sent at two t's), "refuse_n"}.
Every band and generation request is sent in one call, so vLLM batches requests of different profiles together.
OUT: {"bands": {n: {"lp", "top", "t"}}, "generate": [{"n", "max_tokens", "tokens"}], "cache": [{"t", "cached"}],
"cache_tokens": [...], "preemptions": int, "refused": str, "raised": {"lp"}, "wall_s"}.

``--throughput``: the same engine settings on a fixed workload (mixed lengths, greedy, prefix cache off), timed
three times after a warm-up: OUT is {"tok_s": [..], "plugin": bool}. Run once as is and once with VLLM_PLUGINS=
set (vLLM without the plugin: the stock ``longrope`` export) for the ratio.
"""

import json
import os
import sys
import time

from run_vllm import finish, prompt_lp  # also sets vLLM's CPU cache size and log level, before vllm loads


def make_llm(job: dict, **overrides):
    from vllm import LLM

    kwargs = dict(model=job["model"], skip_tokenizer_init=job.get("skip_tokenizer_init", False), dtype=job["dtype"],
                  max_model_len=job["T"] * job["L"], enforce_eager=True, seed=0, block_size=job["block_size"],
                  max_num_batched_tokens=job["max_num_batched_tokens"], enable_chunked_prefill=True,
                  enable_prefix_caching=True, disable_log_stats=False)
    if job.get("num_blocks"):
        kwargs["num_gpu_blocks_override"] = job["num_blocks"]
    kwargs.update(overrides)
    return LLM(**kwargs)


def counter(llm, name: str) -> float:
    return sum(getattr(m, "value", 0) for m in llm.get_metrics() if m.name == name)


def conformance(job: dict) -> dict:
    from vllm import SamplingParams, TokensPrompt

    ids, L = job["ids"], job["L"]
    start = time.perf_counter()
    llm = make_llm(job)
    load_s = time.perf_counter() - start
    prompts, params = [], []
    for n in job["bands"]:
        prompts.append(TokensPrompt(prompt_token_ids=ids[:n]))
        params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))
    for g in job["generate"] + job["preempt"]:
        start = g.get("start", 0)
        prompts.append(TokensPrompt(prompt_token_ids=ids[start : start + g["n"]]))
        params.append(SamplingParams(max_tokens=g["max_tokens"], min_tokens=g["max_tokens"], temperature=0.0))
    preempted0 = counter(llm, "vllm:num_preemptions")
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    batch_s = time.perf_counter() - t0
    result = {"load_s": load_s, "batch_s": batch_s, "bands": {}, "generate": []}
    for n, out in zip(job["bands"], outs, strict=False):
        lp, top = prompt_lp(out, ids)
        result["bands"][str(n)] = {"lp": lp, "top": top}
    for g, out in zip(job["generate"] + job["preempt"], outs[len(job["bands"]) :], strict=True):
        result["generate"].append({**g, "tokens": list(out.outputs[0].token_ids)})
    result["preemptions"] = counter(llm, "vllm:num_preemptions") - preempted0

    # the prefix cache: a prompt no request has sent, at t = 1 (max_tokens 1), then at t = 2 (64), each twice
    cache_ids = job["cache_ids"]
    n = len(cache_ids)
    result["cache"] = []
    for max_tokens in (1, 64, 64, 1):
        hits0 = counter(llm, "vllm:prefix_cache_hits")
        out = llm.generate([TokensPrompt(prompt_token_ids=cache_ids)],
                           SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0),
                           use_tqdm=False)[0]
        result["cache"].append({"max_tokens": max_tokens, "t": -(-(n + max_tokens) // L),
                                "cached": out.num_cached_tokens,
                                "hits": counter(llm, "vllm:prefix_cache_hits") - hits0,
                                "tokens": list(out.outputs[0].token_ids)})

    # a client raises t (never lowers it), and a request beyond T·L is refused in one line
    n = job["bands"][0]
    out = llm.generate([TokensPrompt(prompt_token_ids=ids[:n])],
                       SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1,
                                      extra_args={"clex_t": job["T"]}), use_tqdm=False)[0]
    result["raised"] = {"n": n, "t": job["T"], "lp": prompt_lp(out, ids)[0]}
    try:
        llm.generate([TokensPrompt(prompt_token_ids=ids[: job["refuse_n"]])],
                     SamplingParams(max_tokens=job["T"] * L), use_tqdm=False)
        result["refused"] = ""
    except Exception as exc:  # the plugin's refusal
        result["refused"] = f"{type(exc).__name__}: {exc}"
    return result


def throughput(job: dict) -> dict:
    from vllm import SamplingParams, TokensPrompt

    ids = job["ids"]
    llm = make_llm(job, enable_prefix_caching=False)
    prompts = [TokensPrompt(prompt_token_ids=ids[:n]) for n in job["workload"]]
    params = SamplingParams(max_tokens=job["workload_tokens"], temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up: the same requests, untimed
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        rates.append(sum(len(o.outputs[0].token_ids) + len(o.prompt_token_ids) for o in outs) /
                     (time.perf_counter() - t0))
    return {"tok_s": rates, "plugin": os.environ.get("VLLM_PLUGINS") is None}


def main() -> None:
    job = json.load(open(sys.argv[1]))
    finish(throughput(job) if "--throughput" in sys.argv else conformance(job), sys.argv[2])


if __name__ == "__main__":
    main()
