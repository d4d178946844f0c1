"""Each request at its own t, in ``make test-engines``: the engines checked against clex with t frozen at each
request's t_req = ⌈(prompt + max_tokens) / L⌉ (clex's ``frozen`` policy).

* vLLM with clex's plugin (``clex_vllm``), ONE instance per T: every band's requests sent together (offline
  ``LLM``, and the OpenAI server), chunked prefill forced (a small max-num-batched-tokens) and a small KV cache,
  so batches mix profiles and requests are preempted; 40 greedy tokens per band against
  ``clex.generate(policy="frozen")``; one prompt at t = 1 and at t = 2 (vLLM's own cached-token counts: no
  block shared across t, blocks reused within one t); a client raising t; a refusal; and the plugin's
  throughput against the same export served by vLLM without the plugin, same requests, same run.
* llama.cpp routed by length (``run_llamacpp_routed.py``): one process, one model, a t = 1 and a t = T context
  (the GGUF at T), and with per-t GGUFs a model and context per t in between.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import torch

PLUGIN_STEPS = 128  # --max-num-batched-tokens: every prompt longer than this is prefilled in chunks
BLOCK = 32  # KV block size (vLLM's CPU attention takes multiples of 32)
TOKENS = 40  # greedy tokens compared per generation request


def bands(L: int, T: int) -> list[int]:
    """Prompt lengths n (max_tokens 1, so t_req = ⌈(n + 1)/L⌉) at each profile's edges and inside it."""
    ns = {L // 2, L - 1}
    for t in range(2, T + 1):
        ns |= {(t - 1) * L, (t - 1) * L + L // 2, t * L - 1}
    return sorted(ns)


def generations(L: int, T: int) -> list[dict]:
    """One greedy request per profile; from t = 2 on, its prompt ends 10 tokens before (t−1)·L, so the request
    decodes across the edge at its frozen t."""
    return [{"n": L // 2, "max_tokens": TOKENS}] + [{"n": (t - 1) * L - 10, "max_tokens": TOKENS}
                                                    for t in range(2, T + 1)]


def preempting(L: int, T: int) -> list[dict]:
    """T + 2 greedy requests on prompts no other request shares (no prefix-cache sharing), each growing from L/2
    to L + 16 tokens (t = 2, across L): together more than the KV cache of T·L + 2 blocks holds, so vLLM preempts
    some and computes them again."""
    return [{"start": L + 7 * k, "n": L // 2, "max_tokens": L // 2 + 16} for k in range(T + 2)]


def t_req(need: int, L: int) -> int:
    return max(1, math.ceil(need / L))


def make_job(model: str, ids: list[int], L: int, T: int) -> dict:
    workload = [min(T * L - 8, L // 2 + i * (T * L) // 8) for i in range(8)]  # every band, 8 tokens each
    return {"model": model, "ids": ids, "L": L, "T": T, "dtype": "float32", "block_size": BLOCK,
            "max_num_batched_tokens": PLUGIN_STEPS, "num_blocks": T * L // BLOCK + 2, "bands": bands(L, T),
            "generate": generations(L, T), "preempt": preempting(L, T), "cache_ids": ids[1 : L - 31],
            "refuse_n": T * L - 8,
            "workload": workload, "workload_tokens": 8}


def reference(model_dir, ids: list[int], job: dict) -> dict:
    """clex at each request's frozen t: prompt log-probs per band length, greedy tokens per generation."""
    import clex

    L = job["L"]
    from clex.data.tokens import load_tokenizer
    from clex.generation import eos_ids

    model = clex.from_pretrained(model_dir, dtype=torch.float32).eval()
    modules = clex.clex_modules(model)
    x = torch.tensor(ids)[None]
    out = {"generate": {}, "eos": eos_ids(model, load_tokenizer(str(model_dir)))}

    def at(n: int, t: int) -> dict:
        for m in modules:
            m.t_override = float(t)
        try:
            with torch.no_grad():
                logp = torch.log_softmax(model(x[:, :n]).logits[0, :-1].double(), -1)
        finally:
            for m in modules:
                m.t_override = None
        return {"t": t, "lp": logp.gather(-1, x[0, 1:n, None])[:, 0].numpy(), "top": logp.argmax(-1).numpy()}

    out["bands"] = {n: at(n, t_req(n + 1, L)) for n in job["bands"]}
    out["bands"]["raised"] = at(job["bands"][0], job["T"])  # the first band's prompt, its t raised to T
    for g in job["generate"] + job["preempt"]:
        s, n, k = g.get("start", 0), g["n"], g["max_tokens"]
        tokens = clex.generate(model, x[:, s : s + n], policy="frozen", max_new_tokens=k, min_new_tokens=k,
                               do_sample=False)
        out["generate"][(s, n, k)] = tokens[0, n:].tolist()
    c = torch.tensor(job["cache_ids"])[None]
    tokens = clex.generate(model, c, policy="frozen", max_new_tokens=64, min_new_tokens=64, do_sample=False)
    out["cache"] = tokens[0, c.shape[1] :].tolist()
    return out


def equal(a: list[int], b: list[int]) -> int:
    """Leading tokens that agree."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def band_name(need: int, L: int, T: int) -> str:
    if need <= L:
        return "n ≤ L"
    return "L < n ≤ (T−1)L" if need <= (T - 1) * L else "(T−1)L < n ≤ TL"


def compare(engine: str, T: int, L: int, got: dict, ref: dict, served: dict | None = None) -> list[dict]:
    """One row per band request: |Δ log-prob| against clex at the request's t_req; ``served``: the t an engine
    used where it differs by design (llama.cpp without a GGUF for t_req)."""
    rows = []
    for n, e in got["bands"].items():
        r = ref["bands"][int(n)]
        d = np.abs(np.asarray(e["lp"]) - r["lp"])
        row = {"engine": engine, "T": T, "n": int(n), "need": int(n) + 1, "t": r["t"], "max": float(d.max()),
               "mean": float(d.mean()), "served": (served or {}).get(int(n), r["t"])}
        if "top" in e:
            row["greedy"] = float(np.mean(np.asarray(e["top"]) == r["top"]))
        rows.append(row)
    return rows


def run(models: dict, ids: list[int], L: int, factors: list[int], engines: list[str], run_engine,
        without_plugin: dict, log) -> dict:
    """Run the per-request checks for each T; returns the section for results.json and the doc."""
    section = {"rows": [], "checks": [], "throughput": [], "walls": []}
    refs = {}
    for T in factors:
        log(f"per-request t, T={T}: clex reference at each request's frozen t")
        refs[T] = reference(models["clex"], ids, make_job("", ids, L, T))
    if "routed" in engines:
        routed(models, ids, L, factors, refs, run_engine, section, log)
    if "plugin" in engines:
        plugin(models, ids, L, factors, refs, run_engine, without_plugin, section, log)
    return section


def routed(models: dict, ids: list[int], L: int, factors: list[int], refs: dict, run_engine, section, log) -> None:
    for T in factors:
        job = make_job("", ids, L, T)
        base = {"L": L, "T": T, "threads": 2, "kv": "f32", "gguf": str(models["gguf"][(T, "f32")]), "ids": ids,
                "requests": [{"n": n, "max_tokens": 1} for n in job["bands"]], "generate": job["generate"],
                "suppress": refs[T]["eos"]}
        per_t = {str(t): str(models["gguf"][(t, "f32")]) for t in range(2, T)}
        for name, extra in (("llama.cpp routed, one GGUF", {}), ("llama.cpp routed, per-t GGUFs", {"per_t": per_t})):
            if name.endswith("per-t GGUFs") and not per_t:
                continue
            got, wall, err = run_engine("llamacpp", "run_llamacpp_routed.py", {**base, **extra},
                                        f"routed-{'pert' if extra else 'one'}-T{T}")
            section["walls"].append({"engine": name, "T": T, "wall_s": wall, "error": err})
            if got is None:
                section["checks"].append({"T": T, "check": f"{name} ran", "ok": False, "detail": err})
                continue
            log(f"  {name} T={T}: {wall:.0f} s")
            bands = {"bands": {str(r["n"]): r for r in got["requests"] if "lp" in r}}
            section["rows"] += compare(name, T, L, bands, refs[T], served={r["n"]: r["served_t"]
                                                                         for r in got["requests"]})
            section["checks"].append({"T": T, "check": f"{name}: the t = 1 and t = {T} contexts share one model",
                                      "ok": got["shared_model"], "detail": f"{got['models']} model(s) behind "
                                      f"contexts {got['contexts']}"})
            for g in got["generate"]:
                want = refs[T]["generate"][(0, g["n"], g["max_tokens"])]
                section["checks"].append({"T": T, "check": f"{name}: {g['max_tokens']} greedy tokens, prompt {g['n']}"
                                          f", t_req = {g['t_req']} (served at {g['served_t']}), equal clex's frozen",
                                          "ok": g["tokens"] == want, "measured": g["served_t"] != g["t_req"],
                                          "detail": f"{equal(g['tokens'], want)}/{len(want)} equal"})


def plugin(models: dict, ids: list[int], L: int, factors: list[int], refs: dict, run_engine, without_plugin: dict,
           section: dict, log) -> None:
    got, _, err = run_engine("vllm", "run_plugin_surface.py", {}, "plugin-surface")
    problems = got["problems"] if got else [err]
    version, tested = (got["vllm"], ", ".join(got["tested"])) if got else ("?", "?")
    section["checks"].append({"T": "—", "check": f"the vLLM internals the plugin relies on (vLLM {version}, tested: "
                              f"{tested})", "ok": not problems, "detail": "; ".join(problems) or "all present"})
    if problems:
        log("plugin: vLLM internals changed: " + "; ".join(problems))
        return
    for T in factors:
        job = make_job(str(models["longrope"][T]), ids, L, T)
        ref = refs[T]
        for engine, script in (("vLLM + plugin, offline", "run_vllm_plugin.py"),
                               ("vLLM + plugin, server", "run_vllm_plugin_server.py")):
            got, wall, err = run_engine("vllm", script, job, f"plugin-{script[9:-3]}-T{T}")
            section["walls"].append({"engine": engine, "T": T, "wall_s": wall, "error": err})
            if got is None:
                section["checks"].append({"T": T, "check": f"{engine} ran", "ok": False, "detail": err})
                continue
            log(f"  {engine} T={T}: {wall:.0f} s")
            section["rows"] += compare(engine, T, L, got, ref)
            raised = np.abs(np.asarray(got["raised"]["lp"]) - ref["bands"]["raised"]["lp"]).max()
            section["checks"].append({"T": T, "check": f"{engine}: a client raises t to {T} (clex_t)",
                                      "ok": bool(raised <= 1e-3), "detail": f"max |Δ log-prob| {raised:.1e}"})
            refused = got["refused"]
            section["checks"].append({"T": T, "check": f"{engine}: a request beyond T·L is refused",
                                      "ok": bool(refused) and "\n" not in refused, "detail": refused[:200]})
            if "generate" in got:
                for g in got["generate"]:
                    want = ref["generate"][(g.get("start", 0), g["n"], g["max_tokens"])]
                    t = t_req(g["n"] + g["max_tokens"], L)
                    what = f"overflowing the KV cache together (ids from {g['start']}), " if "start" in g else ""
                    section["checks"].append({"T": T, "check": f"{engine}: {what}{g['max_tokens']} greedy tokens, "
                                              f"prompt {g['n']}, t = {t}, equal clex generate --policy frozen",
                                              "ok": g["tokens"] == want,
                                              "detail": f"{equal(g['tokens'], want)}/{len(want)} equal"})
                c, want, n = got["cache"], ref["cache"], len(job["cache_ids"])
                section["checks"] += [
                    {"T": T, "check": f"{engine}: a new prompt of {n} at t = 2 after t = 1 reuses no block",
                     "ok": c[1]["cached"] == 0, "detail": f"cached tokens {c[1]['cached']}"},
                    {"T": T, "check": f"{engine}: the same prompt again at t = 2, and at t = 1, hits the cache",
                     "ok": c[2]["cached"] > 0 and c[3]["cached"] > 0,
                     "detail": f"cached tokens {c[2]['cached']}, {c[3]['cached']}"},
                    {"T": T, "check": f"{engine}: its 64 greedy tokens at t = 2 equal clex's",
                     "ok": c[1]["tokens"] == want and c[2]["tokens"] == want, "detail": ""},
                    {"T": T, "check": f"{engine}: requests were preempted (small KV cache) and stayed exact",
                     "ok": got["preemptions"] > 0, "detail": f"vllm:num_preemptions {got['preemptions']:.0f}"},
                ]
        rates = {}
        for name, env in (("plugin", None), ("stock", without_plugin)):
            got, wall, err = run_engine("vllm", "run_vllm_plugin.py", job, f"throughput-{name}-T{T}", env=env,
                                        argv=("--throughput",))
            section["walls"].append({"engine": f"vLLM throughput ({name})", "T": T, "wall_s": wall, "error": err})
            rates[name] = got["tok_s"] if got else []
        ratio = statistics.median(rates["plugin"]) / statistics.median(rates["stock"]) if all(rates.values()) else 0
        section["throughput"].append({"T": T, "plugin": rates["plugin"], "stock": rates["stock"], "ratio": ratio})
        section["checks"].append({"T": T, "check": "throughput, plugin / stock longrope (median of 3)",
                                  "ok": ratio >= 0.95, "detail": f"{ratio:.3f}"})
        log(f"  throughput T={T}: plugin/stock {ratio:.3f}")


def failures(section: dict) -> list[str]:
    out = [f"T={c['T']}: {c['check']}: {c['detail']}" for c in section["checks"]
           if not c["ok"] and not c.get("measured")]
    for r in section["rows"]:
        if r["served"] != r["t"]:  # llama.cpp without a GGUF for t_req: served at T by design, measured
            continue
        if r["max"] > 1e-3 or r.get("greedy", 1.0) < 1.0:
            out.append(f"{r['engine']} T={r['T']} n={r['n']}: max |Δ log-prob| {r['max']:.1e}, greedy "
                       f"{100 * r.get('greedy', 1.0):.1f}%")
    return out


def doc_lines(section: dict, L: int) -> list[str]:
    lines = ["## Each request at its own t", "",
             "vLLM: the same exports served by one vLLM instance with clex's plugin (fp32, max_model_len T·L, "
             f"max-num-batched-tokens {PLUGIN_STEPS} so long prompts are prefilled in chunks, KV blocks of {BLOCK}, "
             f"a KV cache of T·L + {2 * BLOCK} tokens), every band's requests sent together. Each request is compared "
             "with clex at its own t_req = ⌈(prompt + max_tokens)/L⌉, fixed for the request (clex's `frozen` policy); "
             "prompt log-probabilities with max_tokens = 1, so need = n + 1. llama.cpp: one process, the GGUF "
             "export at T (f32 weights, f32 KV cache) loaded once with a t = 1 context (n_ctx = L) and a t = T "
             "context (n_ctx = T·L) over it, each request routed by prompt + max_tokens; with per-t GGUFs "
             "(`clex export --to gguf --factor t`) a model and context for each t in between.", "",
             "| engine | T | band (need) | requests | max \\|Δ log-prob\\| | mean \\|Δ log-prob\\| "
             "| greedy agreement |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict = {}
    for r in section["rows"]:
        groups.setdefault((r["engine"], r["T"], band_name(r["need"], L, r["T"]), r["served"] != r["t"]), []).append(r)
    for (engine, T, band, other), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        g = [r["greedy"] for r in rs if "greedy" in r]
        ts = sorted({r["t"] for r in rs})
        at = f"; served at t = {rs[0]['served']}" if other else ""
        lines.append(f"| {engine} | {T} | {band} | n = {', '.join(str(r['n']) for r in rs)} (t = "
                     f"{', '.join(map(str, ts))}{at}) | {max(r['max'] for r in rs):.1e} | "
                     f"{statistics.mean(r['mean'] for r in rs):.1e} | "
                     f"{f'{100 * min(g):.0f}%' if g else '—'} |")
    lines += ["", "| T | check | result | detail |", "| --- | --- | --- | --- |"]
    for c in section["checks"]:
        result = "measured" if c.get("measured") else "pass" if c["ok"] else "FAIL"
        lines.append(f"| {c['T']} | {c['check']} | {result} | {c['detail']} |")
    if section["throughput"]:
        lines += ["", "Throughput on the same 8 requests sent together (prompts of "
                  f"{L // 2} … T·L − 8 tokens, 8 greedy tokens each, prefix cache off), prompt + generated tokens "
                  "per second, three timed repeats after one untimed pass, each side in its own vLLM process:", "",
                  "| T | plugin tok/s | stock longrope tok/s | ratio (medians) |",
                  "| --- | --- | --- | --- |"]
        for t in section["throughput"]:
            lines.append(f"| {t['T']} | {', '.join(f'{x:.0f}' for x in t['plugin'])} | "
                         f"{', '.join(f'{x:.0f}' for x in t['stock'])} | {t['ratio']:.3f} |")
    lines += ["", "| engine | T | wall s | result |", "| --- | --- | --- | --- |"]
    for w in section["walls"]:
        lines.append(f"| {w['engine']} | {w['T']} | {w['wall_s']:.0f} | {w['error'] or 'ok'} |")
    return [*lines, ""]
