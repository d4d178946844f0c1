"""Nothing lost, nothing executed, nothing mixed: `clex train`, `clex demo`, model loading and the CLI.

Every case runs the command in-process and asserts its exit status, its one line on stderr (no
traceback), and that every file that existed before is byte-identical afterwards.
(Evaluations, data files, chat and method parameters: tests/test_safety_eval.py.)
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import clex
from clex.cli.main import main
from clex.io import outdir, records
from tiny import tiny_llama

L = 32


# --- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama, a corpus, and a finished 4-step CLEX run with its checkpoint at step 2."""
    root = tmp_path_factory.mktemp("safety")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLEX_CACHE", str(root / "cache"))
        return _build_world(root)


def _build_world(root):
    model = tiny_llama(max_position_embeddings=L)
    model.save_pretrained(root / "base")
    clex.apply(model, "clex", max_factor=4)
    model.save_pretrained(root / "cx")
    tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256)).save_pretrained(root / "gpt2")
    rng = np.random.default_rng(0)
    words = ["the", "state", "of", "union", "is", "strong", "congress", "people", "nation", "peace"]
    (root / "corpus.txt").write_text(" ".join(rng.choice(words, 3000)))
    run = root / "run"
    assert main(train_args(root, run, "--save-every", "2", "--keep", "3")) == 0
    return root


def train_args(root, out, *extra) -> list[str]:
    return ["train", "--model", str(root / "base"), "--data", str(root / "corpus.txt"), "--tokenizer", "bytes",
            "--method", "clex:max_factor=4", "--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--out", str(out),
            "--no-progress", *extra]


def snapshot(*dirs) -> dict[str, bytes]:
    files = {}
    for d in dirs:
        for path in sorted(d.rglob("*")) if d.exists() else []:
            if path.is_file() and path.name != outdir.LOCK:
                files[str(path)] = path.read_bytes()
    return files


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def unfinished_copy(world, tmp_path, name="resumable"):
    """The finished run as if killed after its step-2 checkpoint (final model and state not yet written)."""
    out = tmp_path / name
    shutil.copytree(world / "run", out)
    manifest = outdir.read(out)
    for item in list(out.iterdir()):
        if item.name not in ("checkpoint-0000002", "train_args.json", "metrics.jsonl", outdir.MANIFEST):
            manifest.remove(item.name)
    return out


class Payload:
    """Unpickling this creates a marker file: proof that a file was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --- 1. no code runs from a file ------------------------------------------------------------------
def test_no_checkpoint_file_is_unpickled(world, tmp_path, capsys):
    checkpoint_files = sorted(p.name for p in (world / "run" / "checkpoint-0000002").iterdir())
    assert not [f for f in checkpoint_files if f.endswith((".pkl", ".bin", ".pt"))]  # nothing pickled is written
    # every file clex writes, plus the pickles accelerate would write (and read back) in their place
    accelerate_files = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin",
                        "pytorch_model.bin")
    targets = [f"checkpoint-0000002/{f}" for f in (*checkpoint_files, *accelerate_files)]
    targets += ["train_args.json", "metrics.jsonl"]
    for i, target in enumerate(targets):
        out = unfinished_copy(world, tmp_path, f"p{i}")
        marker = tmp_path / f"marker-{i}"
        (out / target).write_bytes(pickle.dumps(Payload(marker)))
        code, err = run_cli(capsys, train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))
        assert not marker.exists(), f"{target} was executed"
        name = target.split("/")[-1]
        if target.endswith((".pkl", ".bin")):
            assert code == 0, err  # never read (the checkpoint they were put in is not as clex wrote it)
        elif name == "metrics.jsonl":  # not clex's any more: kept, and the run refused before any work
            assert code == 2 and "metrics.jsonl was changed since clex wrote it" in last_line(err)
        elif name == "train_args.json":
            assert code == 2 and "train_args.json was changed since clex wrote it" in last_line(err)
        else:  # the checkpoint is named as damaged; the run starts again from step 0, the same steps
            assert code == 0 and f"{name} " in err and "damaged" in err, err


# --- 2. user files are never deleted or replaced ----------------------------------------------------
def test_train_refuses_a_directory_of_foreign_files(world, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "thesis.tex").write_text("\\section{}")
    before = snapshot(out)
    code, err = run_cli(capsys, train_args(world, out))
    assert code == 2 and "holds files clex did not write (config.json, thesis.tex)" in last_line(err)
    assert snapshot(out) == before


def test_overwrite_removes_only_what_clex_wrote(world, tmp_path, capsys):
    out = tmp_path / "over"
    shutil.copytree(world / "run", out)
    user = {"README.md": "notes", "tokenizer_notes.txt": "mine", "clex_results.csv": "a,b",
            "model-backup-before-finetune.safetensors": "weights"}
    for name, text in user.items():
        (out / name).write_text(text)
    (out / "checkpoint-0000002" / "mine.txt").write_text("inside a checkpoint")  # no longer as clex wrote it
    before = snapshot(out)
    code, err = run_cli(capsys, train_args(world, out, "--overwrite", "--steps", "2"))
    assert code == 2 and "checkpoint-0000002" in last_line(err) and "nothing was removed" in last_line(err)
    assert snapshot(out) == before
    (out / "checkpoint-0000002" / "mine.txt").rename(tmp_path / "mine.txt")
    code, err = run_cli(capsys, train_args(world, out, "--overwrite", "--steps", "2"))
    assert code == 0, err
    assert {name: (out / name).read_text() for name in user} == user
    assert not (out / "checkpoint-0000002").exists() and (out / "model.safetensors").exists()
    assert set(outdir.foreign(out)) == set(user)


def test_out_equal_to_or_inside_the_model_is_refused(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world / "base", model)
    before = snapshot(model)
    for out in (model, model / "ft"):
        args = train_args(world, out)
        args[args.index("--model") + 1] = str(model)
        code, err = run_cli(capsys, args)
        assert code == 2 and "is the model directory" in last_line(err)
    assert snapshot(model) == before


def test_demo_overwrite_keeps_the_users_files(tmp_path):
    from clex.cli.demo import _check_config, quick_config

    out = tmp_path / "demo"
    cfg = quick_config(out=str(out))
    demo = _check_config(cfg, out, overwrite=False)
    demo.write_text("report.md", "old report")
    outdir.write_in(outdir.nest(out, "eval", "demo") / "cached.json", lambda tmp: tmp.write_text("{}"))
    (out / "thesis.tex").write_text("my thesis")
    with pytest.raises(ValueError, match="other settings"):
        _check_config(quick_config(out=str(out), seed=5), out, overwrite=False)
    # held-out data added to a run: no training changes, nothing removed
    _check_config(quick_config(out=str(out), eval_data=("sotu:test", "kjv:test")), out, overwrite=False)
    assert (out / "report.md").exists() and (out / "eval" / "cached.json").exists()
    _check_config(quick_config(out=str(out), seed=5), out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "my thesis"
    assert not (out / "report.md").exists() and not (out / "eval").exists()


# --- 3. a resume is the same run --------------------------------------------------------------------
@pytest.mark.parametrize("change, named", [
    (("--lr", "0.1"), "--lr (0.001 → 0.1)"),
    (("--text-field", "alt"), "--text-field ('text' → 'alt')"),
    (("--steps", "20"), "--steps (4 → 20)"),
    (("--seed", "3"), "--seed (0 → 3)"),
    (("--clex-lr", "0"), "--clex-lr (None → 0.0)"),
])
def test_resume_with_other_settings_is_refused(world, tmp_path, capsys, change, named):
    out = unfinished_copy(world, tmp_path)
    before = snapshot(out)
    args = train_args(world, out, "--resume")
    if change[0] in args:
        args[args.index(change[0]) + 1] = change[1]
    else:
        args += list(change)
    code, err = run_cli(capsys, args)
    assert code == 2 and named in last_line(err) and "other settings" in last_line(err)
    assert snapshot(out) == before


def test_resume_of_a_finished_run_changes_nothing(world, tmp_path, capsys):
    out = tmp_path / "done"
    shutil.copytree(world / "run", out)
    before = snapshot(out)
    code = main(train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))
    captured = capsys.readouterr()
    assert code == 0 and "finished run of these settings" in captured.out
    code, err = run_cli(capsys, train_args(world, out, "--steps", "5", "--resume"))  # the issue's --steps 5
    assert code == 2 and "--steps (4 → 5)" in last_line(err)
    assert snapshot(out) == before


def test_resume_with_other_data_content_is_refused(world, tmp_path, capsys):
    out = unfinished_copy(world, tmp_path)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((world / "corpus.txt").read_text().replace("peace", "war"))
    args = [a if a != str(world / "corpus.txt") else str(corpus) for a in train_args(world, out, "--resume")]
    train_args_file = json.loads((out / "train_args.json").read_text())
    train_args_file["identity"]["data"] = str(corpus)  # same name, other content
    (out / "train_args.json").write_text(json.dumps(train_args_file))
    manifest = outdir.read(out)  # as if clex had written it so: the run started on this path
    manifest.entries["train_args.json"] = records.record_of(out / "train_args.json")
    manifest._save()
    code, err = run_cli(capsys, args)
    assert code == 2 and "the data's content" in last_line(err)


def test_resume_continues_from_the_checkpoint_to_the_same_model(world, tmp_path, capsys):
    out = unfinished_copy(world, tmp_path)
    code, err = run_cli(capsys, train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))
    assert code == 0, err
    a, b = load_file(world / "run" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- 5. one run per directory -----------------------------------------------------------------------
def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(world, tmp_path, capsys):
    out = unfinished_copy(world, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / outdir.LOCK).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        before = snapshot(out)
        code, err = run_cli(capsys, train_args(world, out, "--resume"))
        assert code == 2 and f"in use by another clex job (pid {holder.pid}" in last_line(err)
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    code, err = run_cli(capsys, train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))  # stale now
    assert code == 0, err
    assert not (out / outdir.LOCK).exists()


@pytest.mark.slow
def test_two_runs_at_once_on_one_directory(world, tmp_path):
    import signal
    import time

    out = tmp_path / "twice"
    cmd = [sys.executable, "-m", "clex", *train_args(world, out, "--steps", "5000")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 180
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert first.poll() is None and time.time() < deadline, "the first run did not start training"
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True, env=env)  # the same command, while it runs
        assert second.returncode == 2
        assert "in use by another clex job (pid" in second.stderr.strip().splitlines()[-1]
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once


# --- 6. one line for every failure ------------------------------------------------------------------
def _damage(world, tmp_path, name: str, how):
    path = tmp_path / name
    shutil.copytree(world / "cx", path)
    how(path)
    return path


def _edit_rope(**changes):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        config["rope_parameters"].update(changes)
        (path / "config.json").write_text(json.dumps(config))

    return edit


def _truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _wrong_clex_shape(path):
    weights = load_file(path / "model.safetensors")
    key = next(k for k in weights if k.endswith("clex_ode.up_proj"))
    weights[key] = torch.zeros(3, 3)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


MODEL_CASES = [
    ("max_factor 0", _edit_rope(max_factor=0), "config.json: invalid rope parameters: max_factor must be"),
    ("act relu", _edit_rope(act="relu"), "config.json: invalid rope parameters: act must be one of"),
    ("t_rule floor", _edit_rope(t_rule="floor"), "config.json: invalid rope parameters: t_rule must be one of"),
    ("truncated weights", _truncate, "model.safetensors is not a readable safetensors file"),
    ("garbage weights", lambda p: (p / "model.safetensors").write_bytes(b"not a tensor file" * 8),
     "model.safetensors is not a readable safetensors file"),
    ("wrong CLEX shape", _wrong_clex_shape, "clex_ode.up_proj in model.safetensors is [3, 3], the config needs"),
]


@pytest.mark.parametrize("case, damage, message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
@pytest.mark.parametrize("command", [
    ["info"], ["eval", "ppl", "--lengths", "32", "--tokenizer", "bytes", "--data", "CORPUS"],
    ["export", "--factor", "2", "--out", "OUT"], ["train", "--data", "CORPUS", "--tokenizer", "bytes", "--out", "OUT"],
])
def test_a_bad_model_directory_is_named_in_one_line(world, tmp_path, capsys, case, damage, message, command):
    model = _damage(world, tmp_path, "bad", damage)
    argv = [*command, "--model", str(model)]
    argv = [str(world / "corpus.txt") if a == "CORPUS" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    before = snapshot(model)
    code, err = run_cli(capsys, argv)
    assert code == 2 and message in last_line(err) and str(model) in last_line(err)
    assert snapshot(model) == before
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("command", [["info"], ["eval", "ppl", "--lengths", "32", "--tokenizer", "bytes"],
                                     ["export", "--factor", "2", "--out", "OUT"]])
def test_a_model_without_rope_is_refused_in_one_line(world, tmp_path, capsys, command):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in [*command, "--model", str(world / "gpt2")]]
    code, err = run_cli(capsys, argv)
    assert code == 2 and "has no rotary module clex can reach" in last_line(err)


CHECKPOINT_CASES = [
    ("truncated model", "model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "is not a readable"),
    ("truncated optimizer", "optimizer.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-10]),
     "is not a readable"),
    ("garbage state", "trainer_state.json", lambda p: p.write_text("{step"), "is not valid JSON"),
    ("bad state", "trainer_state.json", lambda p: p.write_text('{"step": "two"}'),
     "names step 'two', not a step of this run"),
    ("missing rng", "rng-0.safetensors", lambda p: p.unlink(), "is missing"),
]


@pytest.mark.parametrize("recorded", ["before the damage", "after the damage"])
@pytest.mark.parametrize("case, name, damage, message", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_damaged_latest_checkpoint_is_named_and_an_earlier_one_used(world, tmp_path, capsys, case, name, damage,
                                                                      message, recorded):
    """Damage after clex recorded the checkpoint is seen by its record; a checkpoint recorded as it is (a
    manifest rewritten to match) is still checked file by file before it is believed."""
    out = unfinished_copy(world, tmp_path, "run")  # its checkpoint at step 2; one at step 3 is added
    later = out / "checkpoint-0000003"
    shutil.copytree(out / "checkpoint-0000002", later)
    (later / "trainer_state.json").write_text('{"step": 3}')
    if recorded == "after the damage":
        damage(later / name)
    manifest = outdir.read(out)
    manifest.entries[later.name] = records.record_of(later)
    manifest._save()
    if recorded == "before the damage":
        damage(later / name)
        message = "was changed since clex wrote it"
    code, err = run_cli(capsys, train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))
    assert code == 0, err
    warning = next(line for line in err.splitlines() if "warning" in line)
    assert str(later / name) in warning and message in warning and "trying an earlier checkpoint" in warning
    a, b = load_file(world / "run" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 2: the same run


def test_a_checkpoint_without_its_state_file_is_kept_and_does_not_block_the_run(world, tmp_path, capsys):
    out = unfinished_copy(world, tmp_path)
    (out / "checkpoint-0000002" / "trainer_state.json").unlink()  # no longer what clex wrote: never resumed
    left = snapshot(out / "checkpoint-0000002")
    code, err = run_cli(capsys, train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))
    assert code == 0, err
    assert "checkpoint-0000002" in err and snapshot(out / "checkpoint-0000002") == left  # named, kept as it is
    a, b = load_file(world / "run" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # trained again from the start: the same model


def test_a_torn_metrics_line_is_dropped_with_its_line_number(world, tmp_path, capsys):
    out = unfinished_copy(world, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    code, err = run_cli(capsys, train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))
    assert code == 0 and f"{out / 'metrics.jsonl'}:5 is not a metrics record" in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_nan_logits_are_blamed_on_the_model_not_the_learning_rate(world, tmp_path, capsys):
    model = tmp_path / "nan"
    shutil.copytree(world / "base", model)
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"][:] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    args = train_args(world, tmp_path / "out")
    args[args.index("--model") + 1] = str(model)
    code, err = run_cli(capsys, args)
    assert code == 2 and "at step 1, before any update" in last_line(err) and "not --lr" in last_line(err)


def test_ctrl_c_says_where_it_stopped_and_how_to_continue(world, tmp_path, capsys, monkeypatch):
    import clex.train as T

    real = T.Run.save_checkpoint

    def interrupt_after_first_checkpoint(self, step, keep):
        real(self, step, keep)
        raise KeyboardInterrupt

    monkeypatch.setattr(T.Run, "save_checkpoint", interrupt_after_first_checkpoint)
    out = tmp_path / "ctrl-c"
    code, err = run_cli(capsys, train_args(world, out, "--save-every", "2"))
    assert code == 130
    assert "training interrupted; the last checkpoint is checkpoint-0000002" in last_line(err)
    assert "--resume" in last_line(err) and not (out / outdir.LOCK).exists()


def test_an_unexpected_failure_is_one_line_and_debug_shows_the_traceback(world, capsys, monkeypatch):
    import clex.loading as M

    def broken(*args, **kwargs):
        raise RuntimeError("deep inside a library\nwith a second line")

    monkeypatch.setattr(M, "from_pretrained", broken)
    code, err = run_cli(capsys, ["info", "--model", str(world / "cx")])
    assert code == 1 and last_line(err).startswith("clex info: error: RuntimeError: deep inside a library (")
    with pytest.raises(RuntimeError):
        main(["info", "--model", str(world / "cx"), "--debug"])


# --- 7. nonsense is refused before anything is written ----------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (("--keep", "-1"), "--keep must be an integer >= 1"),
    (("--keep", "0"), "--keep must be an integer >= 1, got 0 (the checkpoints a run keeps to resume from)"),
    (("--save-every", "-1"), "--save-every must be an integer >= 0"),
    (("--layout", "chunks", "--chunks", "0"), "--chunks must be an integer from 2"),
    (("--max-factor", "8"), "max_factor given twice"),
    (("--max-grad-norm", "0"), "--max-grad-norm must be positive"),
    (("--lora", "8,16,nothing_proj"), "name no module of the model"),
    (("--resume", "--overwrite"), "pass one of them"),
    (("--lr", "0"), "--lr 0 freezes the base model, so only the CLEX ODE can learn"),
    (("--lr", "0", "--clex-lr", "0"), "--lr 0 freezes the base model, so only the CLEX ODE can learn"),
    (("--lr", "-1"), "learning rates must be finite and >= 0"),
])
def test_bad_training_arguments_write_nothing(world, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    code, err = run_cli(capsys, train_args(world, out, *extra))
    assert code == 2 and message in last_line(err)
    assert not out.exists()
