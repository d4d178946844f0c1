"""Stock transformers (a process that never imports clex) on a ``longrope`` export: prompt log-probabilities.

python run_stock.py JOB.json OUT.json      (JOB/OUT as in run_vllm.py; "dtype": float32 | bfloat16)
"""

import json
import sys
import time

import torch
import transformers
from transformers.utils import logging

logging.set_verbosity_error()


def main() -> None:
    job = json.load(open(sys.argv[1]))
    torch.set_num_threads(int(job.get("threads", 2)))
    ids = torch.tensor(job["ids"])[None]
    result = {}
    for run in job["runs"]:
        start = time.perf_counter()
        dtype = getattr(torch, run["dtype"])
        model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=dtype).eval()
        entry = {"dtype": str(dtype), "load_s": time.perf_counter() - start, "lengths": {}}
        for n in run["lengths"]:
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = model(ids[:, :n], attention_mask=torch.ones_like(ids[:, :n])).logits[0, :-1].double()
            logp = torch.log_softmax(logits, -1)
            lp = logp.gather(-1, ids[0, 1:n, None])[:, 0]
            entry["lengths"][str(n)] = {
                "lp": lp.tolist(),
                "top": logp.argmax(-1).tolist(),
                "s": time.perf_counter() - t0,
            }
        result[run["name"]] = entry
    assert not any(m == "clex" or m.startswith("clex.") for m in sys.modules), "clex was imported"
    json.dump(result, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
