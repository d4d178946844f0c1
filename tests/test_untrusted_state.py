"""What clex finds on disk is checked before it is believed or removed: forged manifests, tampered
checkpoints and run states, foreign lock files, deeply nested JSON, a directory ``clex fetch`` did not
write, and the moments between a command's last files (a kill there is finished by a re-run)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import test_safety as S
from clex.data.fetch import FetchError, fetch, gguf_to_safetensors
from clex.io import checkpoint as C
from clex.io import outdir, records
from test_safety import last_line, run_cli, snapshot, train_args, unfinished_copy
from test_safety_eval import passkey_argv, save_tiny
from tiny import tiny_llama

MANIFEST = outdir.MANIFEST


world = S.world  # test_safety's tiny Llama, corpus and finished run (built once for this module too)


def _write_manifest(path, kind: str, entries: dict) -> None:
    (path / MANIFEST).write_text(json.dumps({"clex_manifest": 2, "kind": kind, "entries": entries}))


def _rerecord(out, name: str) -> None:
    """Record ``out/name`` as it is now, as a forger who rewrites the manifest to match would."""
    manifest = outdir.read(out)
    manifest.entries[name] = records.record_of(out / name)
    manifest._save()


# --- forged manifests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "", "/tmp", "a/../..", "x\0y"])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_manifest_naming_outside_its_directory_is_refused_and_nothing_is_deleted(world, tmp_path, capsys, name,
                                                                                   command):
    parent = tmp_path / "shared"
    out = parent / "out"
    out.mkdir(parents=True)
    (parent / "thesis.tex").write_text("years of work")
    (out / "results.json").write_text("{}")
    kind = "train" if command == "train" else "eval-passkey"
    _write_manifest(out, kind, {name: {"type": "outdir"}, "results.json": records.record_of(out / "results.json")})
    before = snapshot(tmp_path)
    argv = train_args(world, out, "--overwrite") if command == "train" else \
        [str(a) for a in passkey_argv(world / "base", out, "--overwrite")]
    code, err = run_cli(capsys, argv)
    assert code == 2 and f"{out / MANIFEST} is not a clex manifest" in last_line(err)
    assert "is not a plain file name" in last_line(err) and "nothing there is removed" in last_line(err)
    assert snapshot(tmp_path) == before


def test_a_manifest_listing_a_user_file_without_its_content_does_not_delete_it(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    _write_manifest(out, "train", {"thesis.tex": {"type": "file", "size": 13, "sha256": "0" * 64}})
    before = snapshot(out)
    code, err = run_cli(capsys, train_args(world, out, "--overwrite"))
    assert code == 2 and "thesis.tex" in last_line(err) and "nothing was removed" in last_line(err)
    assert snapshot(out) == before


def test_a_users_folder_named_like_a_clex_temporary_survives_every_run(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, train_args(world, out, "--steps", "2"))[0] == 0
    backup = out / ".clex-tmp-mybackup"
    backup.mkdir()
    (backup / "notes.txt").write_text("mine")
    assert run_cli(capsys, train_args(world, out, "--steps", "2", "--overwrite"))[0] == 0
    assert (backup / "notes.txt").read_text() == "mine"
    _write_manifest(out, "train", {**outdir.read(out).entries, backup.name: {"type": "tmp", "ino": 12345}})
    assert run_cli(capsys, train_args(world, out, "--steps", "2", "--overwrite"))[0] == 2  # a forged inode: kept
    assert (backup / "notes.txt").read_text() == "mine"


def test_a_recorded_link_is_unlinked_never_followed(world, tmp_path, capsys):
    out, target = tmp_path / "out", tmp_path / "elsewhere"
    target.mkdir()
    (target / "data.bin").write_text("not clex's")
    assert run_cli(capsys, train_args(world, out, "--steps", "2"))[0] == 0
    (out / "to-elsewhere").symlink_to(target)
    _rerecord(out, "to-elsewhere")  # a link clex recorded as a link
    assert run_cli(capsys, train_args(world, out, "--steps", "2", "--overwrite"))[0] == 0
    assert not (out / "to-elsewhere").is_symlink() and (target / "data.bin").read_text() == "not clex's"


def test_an_oversized_or_old_manifest_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"kind": "eval-ppl", "files": ["results.json"]}))
    with pytest.raises(outdir.OutDirError, match="was written by an older clex"):
        outdir.claim(out, "eval-ppl", overwrite=True)
    (out / MANIFEST).write_text(" " * (outdir.MAX_MANIFEST_BYTES + 1))
    with pytest.raises(outdir.OutDirError, match="is larger than 8 MiB"):
        outdir.claim(out, "eval-ppl", overwrite=True)
    (out / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(outdir.OutDirError, match="nests deeper than"):
        outdir.claim(out, "eval-ppl", overwrite=True)
    (out / MANIFEST).unlink()
    (out / MANIFEST).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(outdir.OutDirError, match="is a link"):
        outdir.claim(out, "eval-ppl", overwrite=True)


# --- tampered state ----------------------------------------------------------------------------------------
def _state(value) -> str:
    return json.dumps({"step": value}) if not isinstance(value, str) else value


STEP_CASES = [
    ("a step past the run", 1_000_000_000_000, "names step 1000000000000, not a step of this run (1 to 4)"),
    ("a boolean step", True, "names step True, not a step of this run"),
    ("another checkpoint's step", 2, "names step 2 in a checkpoint named for step 3"),
    ("deeply nested", "[" * 5000 + "]" * 5000, "nests deeper than"),
]


@pytest.mark.parametrize("case, value, message", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_a_forged_step_is_not_believed(world, tmp_path, capsys, case, value, message):
    out = unfinished_copy(world, tmp_path)
    later = out / "checkpoint-0000003"
    shutil.copytree(out / "checkpoint-0000002", later)
    (later / C.STATE_FILE).write_text(_state(value))
    _rerecord(out, later.name)  # even recorded as clex's, its content is checked
    code, err = run_cli(capsys, train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))
    assert code == 0, err
    assert message in err and str(later / C.STATE_FILE) in err and "trying an earlier checkpoint" in err
    assert json.loads((out / C.STATE_FILE).read_text()) == {"step": 4, "final": True}
    a, b = load_file(world / "run" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same model as the uninterrupted run


def _bad_rng(path):
    state = load_file(path)
    key = next(iter(state))
    save_file({**state, key: state[key][:-7]}, path)


def _bad_rng_dtype(path):
    state = load_file(path)
    save_file({k: v.to(torch.int32) for k, v in state.items()}, path)


def _optimizer_json(change):
    def damage(path):
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))

    return damage


def _first_group(meta):
    return meta["param_groups"][0] if "param_groups" in meta else meta[next(iter(meta))][0]


def _moment_nan(path):
    state = load_file(path)
    key = next(k for k in state if k.endswith("exp_avg"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, path)


def _moment_shape(path):
    state = load_file(path)
    key = next(k for k in state if k.endswith("exp_avg_sq"))
    state[key] = state[key].flatten()[:3].clone()
    save_file(state, path)


STATE_CASES = [
    ("rng of the wrong size", "rng-0.safetensors", _bad_rng, "rng-0.safetensors"),
    ("rng of the wrong dtype", "rng-0.safetensors", _bad_rng_dtype, "rng-0.safetensors"),
    ("an absurd learning rate", C.OPTIM_META, _optimizer_json(lambda m: _first_group(m).update(lr=1e300)),
     "has lr = 1e+300"),
    ("a negative eps", C.OPTIM_META, _optimizer_json(lambda m: _first_group(m).update(eps=-1.0)), "eps"),
    ("a nested optimizer state", C.OPTIM_META, lambda p: p.write_text("[" * 5000 + "]" * 5000), "nests deeper"),
    ("a NaN moment", C.OPTIM, _moment_nan, "exp_avg"),
    ("a moment of another shape", C.OPTIM, _moment_shape, "exp_avg_sq"),
    ("a scheduler at another step", C.SCHED, _optimizer_json(lambda m: m.update(last_epoch=99)),
     "is at step 99, the checkpoint at 2"),
    ("an infinite scheduler rate", C.SCHED, lambda p: p.write_text(p.read_text().replace("0.", "1e999*0.", 1)),
     C.SCHED),
]


@pytest.mark.parametrize("case, name, damage, named", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_a_tampered_state_falls_back_naming_the_file(world, tmp_path, capsys, case, name, damage, named):
    """The only checkpoint tampered with (and recorded so): named, kept, and the run trained from the start."""
    out = unfinished_copy(world, tmp_path)
    only = out / "checkpoint-0000002"
    damage(only / name)
    _rerecord(out, only.name)
    kept = snapshot(only)
    code, err = run_cli(capsys, train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))
    assert code == 0, err
    warning = next(line for line in err.splitlines() if "warning" in line)
    assert str(only / name) in warning and named in warning and "trying an earlier checkpoint" in warning
    assert "the run starts again from step 0" in err and snapshot(only) == kept
    a, b = load_file(world / "run" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("state", ['{"step": 4, "final": true}', '{"step": 4, "final": "no"}', "[" * 5000])
def test_a_top_level_state_clex_did_not_write_is_not_a_finished_run(world, tmp_path, capsys, state):
    out = unfinished_copy(world, tmp_path)
    (out / C.STATE_FILE).write_text(state)  # not in the manifest
    before = snapshot(out)
    code, err = run_cli(capsys, train_args(world, out, "--resume"))
    assert code == 2 and "nothing to do" not in err
    assert f"{out / C.STATE_FILE} was not written by clex" in last_line(err) and snapshot(out) == before


def test_a_recorded_state_without_its_final_model_is_not_finished(world, tmp_path, capsys):
    out = unfinished_copy(world, tmp_path)
    (out / C.STATE_FILE).write_text('{"step": 4, "final": true}')
    _rerecord(out, C.STATE_FILE)
    code, err = run_cli(capsys, train_args(world, out, "--resume"))
    assert "nothing to do" not in err
    assert code == 0 and (out / "model.safetensors").exists()


# --- lock files --------------------------------------------------------------------------------------------
LOCKS = [
    ("a pid that is not a number", '{"pid": "x", "host": "h"}', "its pid is 'x', not a process id"),
    ("a huge pid", '{"pid": 99999999999999999999999, "host": "h"}', "not a process id"),
    ("a list for a pid", '{"pid": [1], "host": "h"}', "its pid is [1], not a process id"),
    ("no pid", '{"host": "h"}', "its pid is None, not a process id"),
    ("no host", '{"pid": 1}', "it names no host"),
    ("a list", "[1, 2]", "does not hold a JSON object"),
    ("not JSON", "pid=12", "is not valid JSON"),
    ("deeply nested", "[" * 3000 + "]" * 3000, "is not a clex lock"),
    ("binary", b"\xc5\x00\xff", "is not a clex lock"),
]


@pytest.mark.parametrize("case, content, message", LOCKS, ids=[c[0] for c in LOCKS])
def test_a_lock_clex_cannot_read_is_named(world, tmp_path, capsys, case, content, message):
    out = unfinished_copy(world, tmp_path)
    lock = out / outdir.LOCK
    lock.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = snapshot(out)
    code, err = run_cli(capsys, train_args(world, out, "--resume"))
    line = last_line(err)
    assert code == 2 and f"{lock} is not a clex lock" in line and message in line and snapshot(out) == before
    assert lock.read_bytes() == (content if isinstance(content, bytes) else content.encode())


def test_a_lock_that_is_a_folder_is_named(world, tmp_path, capsys):
    out = unfinished_copy(world, tmp_path)
    (out / outdir.LOCK).mkdir()
    code, err = run_cli(capsys, train_args(world, out, "--resume"))
    assert code == 2 and "is not a clex lock (it is not a plain file)" in last_line(err)


# --- clex fetch --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    from test_fetch import write_tiny_llama_gguf

    model = tiny_llama(vocab_size=257, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_llama_gguf(path, model)
    return path


def test_fetch_never_takes_a_users_folder_for_a_fetched_model(gguf, tmp_path, monkeypatch):
    from clex.data import fetch as F

    # a model "shipped" in an installed package (json stands in for it): nothing is downloaded
    monkeypatch.setattr(F, "MODELS", {"smollm2": ("json", "0", "json/tiny.gguf")})
    monkeypatch.setattr(F, "gguf_to_safetensors", lambda _, out: gguf_to_safetensors(gguf, out))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    with pytest.raises(FetchError, match="holds files clex fetch did not write"):
        fetch("smollm2", mine)
    assert (mine / "config.json").read_text() == '{"mine": true}' and len(list(mine.iterdir())) == 1

    done = fetch("smollm2", tmp_path / "fetched")
    assert (done / "config.json").exists() and fetch("smollm2", done) == done  # fetched: found again
    (done / "config.json").write_text('{"edited": true}')
    with pytest.raises(FetchError, match="holds files clex fetch did not write .or changed since."):
        fetch("smollm2", done)


# --- the moments between a command's last files ------------------------------------------------------------
@pytest.mark.parametrize("plot", ["plot_task", "plot_heatmap"])
def test_a_passkey_killed_while_plotting_finishes_on_the_same_command(tmp_path, capsys, monkeypatch, plot):
    from clex.cli.main import main
    from clex.eval import report as R

    model = save_tiny(tmp_path / "model", L=64)
    out = tmp_path / "out"
    real = getattr(R, plot)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, plot, killed)
    assert main([str(a) for a in passkey_argv(model, out)]) == 130
    assert "run the same command again" in capsys.readouterr().err and not (out / "results.json").exists()
    monkeypatch.setattr(R, plot, real)
    assert main([str(a) for a in passkey_argv(model, out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["rows"] and (out / "passkey_heatmap.png").exists()
    assert not (out / "partial.jsonl").exists()


def _ppl_killed_at_64(tmp_path, monkeypatch) -> tuple[list[str], object, object]:
    """A perplexity run (lengths 32 and 64) stopped by Ctrl-C at 64: (its argv, its --out, the real window
    evaluator, to restore)."""
    from clex.cli.main import main
    from clex.eval import ppl as P

    model = save_tiny(tmp_path / "model", L=32)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    argv = ["eval", "ppl", "--model", str(model), "--methods", "vanilla", "--lengths", "32,64", "--data", str(corpus),
            "--samples", "2", "--tokenizer", "bytes", "--no-progress", "--out", str(out)]
    real = P.evaluate_windows

    def killed_at_64(model, windows, stride, length, *rest):
        if length == 64:
            raise KeyboardInterrupt
        return real(model, windows, stride, length, *rest)

    monkeypatch.setattr(P, "evaluate_windows", killed_at_64)
    assert main(argv) == 130
    return argv, out, real


def test_a_perplexity_run_killed_midway_finishes_on_the_same_command(tmp_path, capsys, monkeypatch):
    from clex.cli.main import main
    from clex.eval import ppl as P

    argv, out, real = _ppl_killed_at_64(tmp_path, monkeypatch)
    assert json.loads((out / "results.json").read_text())["complete"] is False
    monkeypatch.setattr(P, "evaluate_windows", real)
    assert main(argv) == 0, capsys.readouterr().err
    payload = json.loads((out / "results.json").read_text())
    assert "complete" not in payload and [r["length"] for r in payload["results"]] == [32, 64]
    assert main(argv) == 2 and "already holds results" in capsys.readouterr().err  # complete now: kept


# --- forgeries that cost time or pass as clex's ---------------------------------------------------------------
def test_nested_output_directories_deeper_than_clex_writes_are_kept_in_one_line(tmp_path):
    import time

    out = tmp_path / "out"
    level = out
    for _ in range(400):  # each level records the next as a nested output directory
        level.mkdir()
        _write_manifest(level, "demo", {"a": {"type": "outdir"}})
        level = level / "a"
    level.mkdir()
    (level / "thesis.tex").write_text("mine")
    start = time.perf_counter()
    with pytest.raises(outdir.OutDirError, match="holds entries that were changed .* nothing was removed"):
        outdir.claim(out, "demo", overwrite=True)
    assert time.perf_counter() - start < 5 and (level / "thesis.tex").read_text() == "mine"


def test_a_record_replacing_a_chain_of_records_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("x")
    true = records.record_of(out / "a")
    _write_manifest(out, "eval-ppl", {"a": {**true, "was": {**true, "was": true}}})
    with pytest.raises(outdir.OutDirError, match="replaces a record that replaces another"):
        outdir.read(out)


def test_a_name_no_file_can_have_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text('{"clex_manifest": 2, "kind": "eval-ppl", "entries": {"\\ud800": {"type": "outdir"}}}')
    with pytest.raises(outdir.OutDirError, match="is not a clex manifest .*is not a plain file name"):
        outdir.read(out)


def test_an_empty_log_record_does_not_pass_for_a_users_file(world, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    empty = {"type": "log", "size": 0, "sha256": hashlib.sha256(b"").hexdigest(), "ino": 1}
    _write_manifest(out, "train", {"thesis.tex": empty})
    code, err = run_cli(capsys, train_args(world, out, "--overwrite"))
    assert code == 2 and "thesis.tex" in last_line(err) and (out / "thesis.tex").read_text() == "years of work"


def test_a_kill_between_creating_a_temporary_and_recording_it_does_not_block_the_run(world, tmp_path, capsys):
    out = unfinished_copy(world, tmp_path)
    (out / ".clex-tmp-final").mkdir()  # created, never recorded: the kill came before the manifest was saved
    (out / ".clex-tmp-checkpoint-0000004").mkdir()
    code, err = run_cli(capsys, train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))
    assert code == 0, err
    a, b = load_file(world / "run" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    nested = tmp_path / "demo"
    nested.mkdir()
    _write_manifest(nested, "demo", {"finetuned": {"type": "outdir"}})
    (nested / "finetuned").mkdir()  # recorded, then killed before its own manifest was written
    assert outdir.claim(nested, "demo", overwrite=True).files == []


def test_a_scheduler_state_with_fields_of_its_own_falls_back(world, tmp_path, capsys):
    out = unfinished_copy(world, tmp_path)
    only = out / "checkpoint-0000002"
    sched = json.loads((only / C.SCHED).read_text())
    (only / C.SCHED).write_text(json.dumps({**sched, "optimizer": 5}))
    _rerecord(out, only.name)
    code, err = run_cli(capsys, train_args(world, out, "--save-every", "2", "--keep", "3", "--resume"))
    assert code == 0, err
    assert f"{only / C.SCHED} holds fields the scheduler does not have (optimizer)" in err


def test_a_model_config_nested_too_deep_is_named(world, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(world / "base", model)
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, err = run_cli(capsys, ["info", "--model", str(model)])
    assert code == 2 and f"{model / 'config.json'} nests deeper than" in last_line(err)


def test_task_cells_are_read_only_as_clex_recorded_them(tmp_path, capsys, monkeypatch):
    """A cell appended after clex's recorded prefix (forged, or cut by a kill) is never believed."""
    from clex.cli.main import main
    from clex.eval import tasks as T
    from test_safety_eval import GREEDY

    model = save_tiny(tmp_path / "model", L=64)
    out = tmp_path / "out"
    calls = []

    def stop_after_one(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return GREEDY(*args, **kwargs)

    monkeypatch.setattr(T, "greedy_answers", stop_after_one)
    assert main([str(a) for a in passkey_argv(model, out)]) == 130
    partial = out / "partial.jsonl"
    first = json.loads(partial.read_text().splitlines()[0])
    forged = {**first, "row": {**first["row"], "depth": 100.0, "score": 1.0}}
    with open(partial, "a") as f:
        f.write(json.dumps(forged) + "\n" + "[" * 100_000 + "\n")
    monkeypatch.setattr(T, "greedy_answers", GREEDY)
    assert main([str(a) for a in passkey_argv(model, out)]) == 0, capsys.readouterr().err
    rows = json.loads((out / "results.json").read_text())["rows"]
    clean = tmp_path / "clean"
    assert main([str(a) for a in passkey_argv(model, clean)]) == 0
    assert [(r["method"], r["depth"], r["score"]) for r in rows] == \
        [(r["method"], r["depth"], r["score"]) for r in json.loads((clean / "results.json").read_text())["rows"]]


def test_a_perplexity_out_changed_since_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from clex.cli.main import main
    from clex.eval import ppl as P

    argv, out, real = _ppl_killed_at_64(tmp_path, monkeypatch)
    with open(out / "results.md", "a") as f:
        f.write("my notes\n")
    calls = []
    monkeypatch.setattr(P, "evaluate_windows", lambda *a: calls.append(1) or real(*a))
    assert main(argv) == 2 and "results.md was changed since clex wrote it" in capsys.readouterr().err
    assert calls == []


def test_a_name_that_is_neither_here_nor_on_the_hub_is_named(tmp_path, capsys, monkeypatch):
    from clex import loading as models

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your connection.")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models.AutoConfig, "from_pretrained", offline)
    code, err = run_cli(capsys, ["info", "--model", "nowhere/model"])
    assert code == 2 and "nowhere/model is no model directory here, and the hub could not give it" in last_line(err)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_a_copy(world, tmp_path, capsys):
    first = tmp_path / "first"
    args = train_args(world, first, "--save-every", "3", "--steps", "4")
    from clex.training import loop as TR

    real = TR.Run.save_checkpoint

    def killed(self, step, keep):
        raise KeyboardInterrupt

    TR.Run.save_checkpoint = killed
    try:
        assert run_cli(capsys, args)[0] == 130
    finally:
        TR.Run.save_checkpoint = real
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)  # new inodes: the metrics log is recognised by its recorded content
    code, err = run_cli(capsys, [*train_args(world, copy, "--save-every", "3", "--steps", "4"), "--resume"])
    assert code == 0, err


def test_an_empty_leftover_hard_linked_elsewhere_is_never_written_through(tmp_path):
    out = outdir.claim(tmp_path / "out", "eval-ppl")
    victim = tmp_path / "victim.txt"
    victim.write_text("")
    os.link(victim, out.path / f".clex-tmp-{os.getpid()}-results.md")
    with pytest.raises(outdir.OutDirError, match="was not written by clex"):
        out.write_text("results.md", "clex table\n")
    assert victim.read_text() == ""


def test_a_record_inside_a_directory_record_cannot_replace_another(tmp_path):
    out = tmp_path / "out"
    (out / "d").mkdir(parents=True)
    (out / "d" / "f").write_text("x")
    inner = records.record_of(out / "d" / "f")
    _write_manifest(out, "train", {"d": {"type": "dir", "entries": {"f": {**inner, "was": inner}}}})
    with pytest.raises(outdir.OutDirError, match="inside a directory record replaces another record"):
        outdir.read(out)
