"""`clex train` on a tiny byte-level Llama: learning, LoRA, resume after kill -9, two processes, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch
import transformers as tf

import clex
from clex.io.train_run import TrainError
from clex.methods import declare_length
from clex.training.loop import train
from clex.training.options import TrainConfig
from clex.training.step import cosine_schedule, step_positions

L = 32


@pytest.fixture
def corpus(words_corpus):
    return str(words_corpus)


@pytest.fixture
def model_dir(llama_dir):
    assert tf.AutoConfig.from_pretrained(llama_dir).max_position_embeddings == L
    return str(llama_dir)


def cfg(model_dir, corpus, out, **kw) -> TrainConfig:
    base = dict(model=model_dir, out=str(out), method="clex:max_factor=4", data=corpus, tokenizer="bytes",
                steps=30, batch_size=4, lr=3e-3, clex_lr=1e-2, warmup=0.1, show_progress=False)
    return TrainConfig(**{**base, **kw})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_clex_training_learns_and_trains_clex(model_dir, corpus, tmp_path):
    out = train(cfg(model_dir, corpus, tmp_path / "run"))
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert set(rows[0]) >= {"step", "loss", "t", "lr", "tokens_per_s"}
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < first - 0.3, (first, last)
    assert {r["t"] for r in rows} > {1}  # several t' drawn
    model = clex.from_pretrained(out)
    ode = clex.clex_modules(model)[0].clex_ode
    assert ode.down_proj.abs().sum() > 0  # trained away from the init W_down = 0
    assert json.loads((out / "trainer_state.json").read_text())["final"]


@pytest.mark.parametrize("method,factor", [("pi:factor=2", 2), ("yarn:factor=2", 2), ("ntk:factor=2", 2)])
def test_fixed_factor_methods_train_at_their_factor(model_dir, corpus, tmp_path, method, factor):
    out = train(cfg(model_dir, corpus, tmp_path / "run", method=method, train_length=factor * L, steps=3))
    assert all(r["t"] == 1 for r in metrics(out))
    model = clex.from_pretrained(out)
    assert model.config.rope_parameters["rope_type"] == method.split(":")[0].replace("pi", "linear")


def test_t_draws_are_uniform():
    draws = [step_positions("scatter", 2, L, L, 8, seed=0, step=s)[0] for s in range(4000)]
    counts = Counter(draws)
    assert set(counts) == set(range(1, 9))
    expected = len(draws) / 8
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001
    t, pos = step_positions("scatter", 2, L, L, 8, seed=0, step=5)
    assert pos[-1] == L * t - 1 and (t, pos.tolist()) == (
        step_positions("scatter", 2, L, L, 8, seed=0, step=5)[0],
        step_positions("scatter", 2, L, L, 8, seed=0, step=5)[1].tolist(),
    )


def test_log_t_sampling_weights_t_by_its_inverse():
    draws = [step_positions("chunks", 2, L, L, 8, seed=0, step=s, sampling="log")[0] for s in range(8000)]
    counts = Counter(draws)
    weights = {t: 1 / t for t in range(1, 9)}
    expected = {t: len(draws) * w / sum(weights.values()) for t, w in weights.items()}
    chi2 = sum((counts[t] - e) ** 2 / e for t, e in expected.items())
    assert set(counts) == set(range(1, 9)) and chi2 < 24.3  # 7 degrees of freedom, p = 0.001
    assert counts[1] > 2.5 * counts[8]


def test_cosine_schedule_is_transformers_and_clex_warmup_ramps_the_ode_only():
    from transformers import get_cosine_schedule_with_warmup

    steps, warmup = 100, 0.05
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(opt, int(warmup * steps), steps).lr_lambdas[0]
    base, same = cosine_schedule(steps, warmup)
    assert [base(s) for s in range(steps + 1)] == pytest.approx([reference(s) for s in range(steps + 1)], abs=1e-12)
    assert [same(s) for s in range(steps + 1)] == [base(s) for s in range(steps + 1)]  # default: no own warm-up
    _, clex_lambda = cosine_schedule(steps, warmup, clex_warmup=0.4)
    assert clex_lambda(20) == pytest.approx(base(20) * 0.5) and clex_lambda(0) == 0
    assert [clex_lambda(s) for s in range(40, steps + 1)] == [base(s) for s in range(40, steps + 1)]


def test_clex_lr_zero_freezes_the_ode_and_trains_the_rest(model_dir, corpus, tmp_path):
    out = train(cfg(model_dir, corpus, tmp_path / "frozen", clex_lr=0.0, steps=6))
    model = clex.from_pretrained(out)
    assert clex.clex_modules(model)[0].clex_ode.down_proj.abs().sum() == 0  # still the init: NTK α = 2t−1
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_lr_zero_freezes_the_model_and_trains_only_the_ode(model_dir, corpus, tmp_path):
    out = train(cfg(model_dir, corpus, tmp_path / "ode-only", lr=0.0, clex_lr=1e-2, steps=6))
    model = clex.from_pretrained(out)
    assert clex.clex_modules(model)[0].clex_ode.down_proj.abs().sum() > 0  # the ODE learned
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    trained = dict(model.named_parameters())
    for name, p in base.named_parameters():  # every weight of the model is bit for bit the base's
        assert torch.equal(trained[name], p), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm_base"] == 0 for r in records)
    assert all(r["grad_norm_clex"] > 0 for r in records if r["t"] > 1) and any(r["t"] > 1 for r in records)
    for bad in (dict(clex_lr=None), dict(clex_lr=0.0), dict(method="yarn:factor=4", clex_lr=None)):
        with pytest.raises(TrainError, match="`lr` 0 freezes the base model"):
            train(cfg(model_dir, corpus, tmp_path / "refused", lr=0.0, **bad))
        assert not (tmp_path / "refused").exists()


def test_lora_freezes_base_trains_clex_saves_reloads_merges(model_dir, corpus, tmp_path):
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    out = train(cfg(model_dir, corpus, tmp_path / "lora", lora="4,8,q_proj,v_proj", steps=10))
    assert (out / "adapter_config.json").exists() and (out / "clex_ode.safetensors").exists()
    merged = clex.from_pretrained(out)  # base + method + CLEX weights + adapter, merged
    assert clex.clex_modules(merged)[0].clex_ode.down_proj.abs().sum() > 0
    sd = merged.state_dict()
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], base.state_dict()["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], base.model.layers[0].self_attn.q_proj.weight)
    out2 = train(cfg(model_dir, corpus, tmp_path / "merged", lora="4,8,q_proj,v_proj", steps=10, merge=True))
    plain = tf.AutoModelForCausalLM.from_pretrained(out2).eval()  # merged weights, no peft needed
    ids = torch.randint(0, 256, (1, 3 * L), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, merged.eval()(ids).logits, rtol=0, atol=1e-5)


def _cli(model_dir, corpus, out, *extra):
    return [sys.executable, "-m", "clex", "train", "--model", model_dir, "--data", corpus, "--tokenizer", "bytes",
            "--method", "clex", "--max-factor", "4", "--steps", "16", "--batch-size", "4", "--lr", "3e-3",
            "--out", str(out), "--no-progress", *extra]


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(model_dir, corpus, tmp_path):
    # train length 4L: the long regime (fractional positions), and steps slow enough to kill mid-run
    long = ("--train-length", str(4 * L))
    ref = tmp_path / "ref"
    subprocess.run(_cli(model_dir, corpus, ref, *long), check=True, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(model_dir, corpus, out, *long, "--save-every", "4"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint-0000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "trainer_state.json").exists()  # it really died mid-run
    resumed = _cli(model_dir, corpus, out, *long, "--save-every", "4", "--resume")
    subprocess.run(resumed, check=True, capture_output=True)
    a, b = metrics(ref), metrics(out)
    assert [r["step"] for r in b] == list(range(1, 17))
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6, abs=1e-6)
    sa = clex.from_pretrained(ref).state_dict()
    sb = clex.from_pretrained(out).state_dict()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one(model_dir, corpus, tmp_path):
    one = tmp_path / "one"
    subprocess.run(_cli(model_dir, corpus, one, "--steps", "6"), check=True, capture_output=True)
    two = tmp_path / "two"
    # accelerate's launcher starts one CPU process unless MPI is set up; torch's own launcher gives
    # accelerate a gloo process group (DistributedType.MULTI_CPU), as `accelerate launch` does on GPUs.
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
              "-m", "clex"]
    cmd = launch + _cli(model_dir, corpus, two, "--steps", "6", "--batch-size", "2")[3:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = metrics(one), metrics(two)
    assert [r["t"] for r in a] == [r["t"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-4)


# --- refusals -------------------------------------------------------------------------------------
def test_refusals(model_dir, corpus, tmp_path):
    out = tmp_path / "run"
    train(cfg(model_dir, corpus, out, steps=2))
    with pytest.raises(TrainError, match="already holds a finished training run"):
        train(cfg(model_dir, corpus, out, steps=2))
    with pytest.raises(TrainError, match=r"other settings .*`batch_size` \(4 → 2\)"):
        train(cfg(model_dir, corpus, out, steps=2, batch_size=2, resume=True))
    train(cfg(model_dir, corpus, out, steps=2, overwrite=True))  # replaces it
    with pytest.raises(TrainError, match="longer than vanilla supports"):
        train(cfg(model_dir, corpus, tmp_path / "v", method="vanilla", train_length=2 * L))
    with pytest.raises(TrainError, match="longer than pi:factor=2 supports"):
        train(cfg(model_dir, corpus, tmp_path / "p", method="pi:factor=2", train_length=3 * L))
    with pytest.raises(TrainError, match="longer than clex:max_factor=4 supports"):
        train(cfg(model_dir, corpus, tmp_path / "c", train_length=5 * L))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short " * 5)
    with pytest.raises(TrainError, match="fewer than one global batch"):
        train(cfg(model_dir, str(tiny), tmp_path / "t"))
    with pytest.raises(TrainError, match="`lora` must look like"):
        train(cfg(model_dir, corpus, tmp_path / "l", lora="eight"))
    with pytest.raises(TrainError, match="holds no run"):
        train(cfg(model_dir, corpus, tmp_path / "nothing", resume=True))
    with pytest.raises(ValueError, match="unknown method"):
        train(cfg(model_dir, corpus, tmp_path / "m", method="warp"))
    with pytest.raises(TrainError, match="`t_sampling` must be one of"):
        train(cfg(model_dir, corpus, tmp_path / "s", t_sampling="normal"))
    with pytest.raises(TrainError, match="`clex_warmup` must be a fraction"):
        train(cfg(model_dir, corpus, tmp_path / "w", clex_warmup=2.0))
    with pytest.raises(TrainError, match=r"`t_sampling` \('uniform' → 'log'\)"):
        train(cfg(model_dir, corpus, out, steps=2, t_sampling="log", resume=True))


@pytest.mark.slow
def test_fsdp_over_two_processes_takes_the_steps_of_one_and_resumes(model_dir, corpus, tmp_path):
    from safetensors.torch import load_file

    from clex.io import outdir

    one = tmp_path / "one"
    subprocess.run(_cli(model_dir, corpus, one, "--steps", "6"), check=True, capture_output=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
              "-m", "clex"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}

    def sharded(out, *extra):
        cmd = launch + _cli(model_dir, corpus, out, "--steps", "6", "--batch-size", "2", "--fsdp", "full_shard",
                            "--save-every", "3", "--keep", "3", *extra)[3:]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-3000:]

    two = tmp_path / "two"
    sharded(two)
    a, b = metrics(one), metrics(two)
    assert [r["t"] for r in a] == [r["t"] for r in b]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], abs=1e-4)
    final, reference = load_file(two / "model.safetensors"), load_file(one / "model.safetensors")
    key = "model.rotary_emb.clex_ode.down_proj"
    assert final[key].dtype == torch.float32 and final[key].abs().sum() > 0  # updated (zero at init)
    for name, value in reference.items():
        torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-4)
    clex.from_pretrained(two)
    # a sharded checkpoint resumes: the run as if killed after step 3, then resumed over two processes
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(two, resumed)
    manifest = outdir.read(resumed)
    for item in list(resumed.iterdir()):
        if item.name not in ("checkpoint-0000003", "train_args.json", "metrics.jsonl", outdir.MANIFEST):
            manifest.remove(item.name)
    sharded(resumed, "--resume")
    assert [r["loss"] for r in metrics(resumed)] == pytest.approx([r["loss"] for r in b], abs=1e-6)
    again = load_file(resumed / "model.safetensors")
    for name, value in final.items():
        torch.testing.assert_close(again[name], value, rtol=1e-6, atol=1e-6)


def test_clex_below_the_models_training_length_is_refused_with_the_regime_explained(model_dir, corpus, tmp_path):
    with pytest.raises(TrainError, match=r"train length 16 is shorter than the model's training length L = 32: .*"
                                         r"declare that L: `base_length` 16"):
        train(cfg(model_dir, corpus, tmp_path / "short", train_length=16))
    assert not (tmp_path / "short").exists()
    run = train(cfg(model_dir, corpus, tmp_path / "declared", method=declare_length("clex", 16), train_length=16,
                    steps=2))
    assert clex.from_pretrained(run).config.rope_parameters["original_max_position_embeddings"] == 16
