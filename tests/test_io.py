"""The file plumbing of ``clex.io`` on its own: atomic writes, the job lock, output directories and their manifests,
model fingerprints, training checkpoints and the "finished run" test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from clex.errors import DamagedFile, OutDirError
from clex.io import checkpoint as C
from clex.io import outdir
from clex.io.atomic import atomic_write
from clex.io.fingerprint import model_fingerprint
from clex.io.lock import LOCK, locked
from clex.io.train_run import finished
from tiny import save_llama, tiny_llama


def listing(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# --- atomic_write -----------------------------------------------------------------------------------------
def test_atomic_write_puts_the_whole_file_in_place(tmp_path):
    target = tmp_path / "new" / "deep" / "notes.txt"  # missing parents are made
    assert atomic_write(target, lambda tmp: tmp.write_text("all of it")) == target
    assert target.read_text() == "all of it" and listing(target.parent) == ["notes.txt"]


def test_atomic_write_fills_a_clex_temporary_beside_the_target_while_the_old_content_stays(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old")
    seen = {}

    def fill(tmp):
        seen["tmp"], seen["target during fill"] = tmp, target.read_text()
        tmp.write_text("new")

    atomic_write(target, fill)
    tmp = seen["tmp"]
    assert tmp.parent == tmp_path and tmp.name.startswith(".clex-tmp-notes.txt-") and tmp != target
    assert seen["target during fill"] == "old"  # replaced only once the temporary is whole
    assert target.read_text() == "new" and listing(tmp_path) == ["notes.txt"]


def test_a_failing_fill_leaves_the_old_content_and_no_temporary(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("old")

    def fill(tmp):
        tmp.write_text("half of the ne")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(target, fill)
    assert target.read_text() == "old" and listing(tmp_path) == ["notes.txt"]
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "never.txt", fill)
    assert listing(tmp_path) == ["notes.txt"]  # nothing of a target that never existed


# --- locked -----------------------------------------------------------------------------------------------
def test_a_held_lock_refuses_a_second_job_and_is_released_after(tmp_path):
    with locked(tmp_path):
        holder = json.loads((tmp_path / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutDirError, match=f"in use by another clex job .pid {os.getpid()}"), locked(tmp_path):
            pass
        assert (tmp_path / LOCK).exists()  # the refused job did not release the holder's lock
    assert not (tmp_path / LOCK).exists()
    with locked(tmp_path):  # free again
        pass


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_lock_is_taken_over(tmp_path):
    pid = _dead_pid()
    (tmp_path / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": 0}))
    with locked(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_of_another_host_is_believed(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"pid": _dead_pid(), "host": "not-" + socket.gethostname()}))
    with pytest.raises(OutDirError, match="in use by another clex job"), locked(tmp_path):
        pass
    assert (tmp_path / LOCK).exists()


@pytest.mark.parametrize(("content", "why"), [("hello", "is not a clex lock"),
                                              ('{"pid": "1", "host": "h"}', "its pid is '1', not a process id"),
                                              ('{"pid": 5}', "names no host")])
def test_a_file_under_the_locks_name_that_is_not_a_lock_is_refused_and_kept(tmp_path, content, why):
    (tmp_path / LOCK).write_text(content)
    with pytest.raises(OutDirError, match=why), locked(tmp_path):
        pass
    assert (tmp_path / LOCK).read_text() == content


def test_a_folder_under_the_locks_name_is_refused_and_kept(tmp_path):
    (tmp_path / LOCK).mkdir()
    (tmp_path / LOCK / "mine").write_text("keep")
    with pytest.raises(OutDirError, match="not a plain file"), locked(tmp_path):
        pass
    assert (tmp_path / LOCK / "mine").read_text() == "keep"


# --- output directories -----------------------------------------------------------------------------------
def test_claim_refuses_a_folder_holding_someone_elses_file(tmp_path):
    (tmp_path / "mine.txt").write_text("mine")
    with pytest.raises(OutDirError, match=r"holds files clex did not write \(mine.txt\)"):
        outdir.claim(tmp_path, "eval")
    assert listing(tmp_path) == ["mine.txt"] and (tmp_path / "mine.txt").read_text() == "mine"
    with pytest.raises(OutDirError, match="holds files clex did not write"):
        outdir.claim(tmp_path, "eval", overwrite=True)  # overwrite removes clex's files only: nothing here
    assert listing(tmp_path) == ["mine.txt"]


def test_claim_makes_a_new_folder_and_records_what_clex_writes(tmp_path):
    out = outdir.claim(tmp_path / "out", "eval")
    out.write_text("a.txt", "A")
    out.write_text("b.txt", "B")
    again = outdir.read(tmp_path / "out")
    assert again.kind == "eval" and sorted(again.files) == ["a.txt", "b.txt"]
    assert again.holds("a.txt") and not again.holds("c.txt")
    assert listing(tmp_path / "out") == [outdir.MANIFEST, "a.txt", "b.txt"]  # no temporary left behind
    out.write_text("a.txt", "A2")  # clex's own file, as clex wrote it: replaced
    assert (tmp_path / "out" / "a.txt").read_text() == "A2" and outdir.read(tmp_path / "out").holds("a.txt")


def test_overwrite_removes_only_the_recorded_entries(tmp_path):
    out = outdir.claim(tmp_path, "eval")
    out.write_text("a.txt", "A")
    (tmp_path / "mine.txt").write_text("mine")  # the user's, put there later
    again = outdir.claim(tmp_path, "eval", overwrite=True)
    assert listing(tmp_path) == [outdir.MANIFEST, "mine.txt"] and (tmp_path / "mine.txt").read_text() == "mine"
    assert again.files == []


def test_a_changed_recorded_file_is_refused_on_overwrite_and_nothing_is_removed(tmp_path):
    out = outdir.claim(tmp_path, "eval")
    out.write_text("a.txt", "A")
    out.write_text("b.txt", "B")
    (tmp_path / "a.txt").write_text("edited by hand")
    with pytest.raises(OutDirError, match=r"changed since clex wrote them .*\(a.txt\); they are kept and nothing"):
        outdir.claim(tmp_path, "eval", overwrite=True)
    assert (tmp_path / "a.txt").read_text() == "edited by hand" and (tmp_path / "b.txt").read_text() == "B"
    with pytest.raises(OutDirError, match="a.txt was changed since clex wrote it"):
        out.write_text("a.txt", "replaced")
    with pytest.raises(OutDirError, match="a.txt was changed since clex wrote it"):
        out.remove("a.txt")
    assert (tmp_path / "a.txt").read_text() == "edited by hand"


def test_write_text_refuses_a_name_someone_else_took(tmp_path):
    out = outdir.claim(tmp_path, "eval")
    (tmp_path / "report.md").write_text("mine")
    with pytest.raises(OutDirError, match="report.md was not written by clex"):
        out.write_text("report.md", "clex's")
    assert (tmp_path / "report.md").read_text() == "mine" and not outdir.read(tmp_path).holds("report.md")


def test_remove_takes_a_recorded_entry_out_of_the_folder_and_the_manifest(tmp_path):
    out = outdir.claim(tmp_path, "eval")
    out.write_text("a.txt", "A")
    out.write_text("b.txt", "B")
    out.remove("a.txt")
    assert listing(tmp_path) == [outdir.MANIFEST, "b.txt"] and outdir.read(tmp_path).files == ["b.txt"]
    with pytest.raises(OutDirError):
        out.remove("a.txt")  # no longer clex's to remove


def test_claim_refuses_another_kind_of_job_unless_overwrite(tmp_path):
    outdir.claim(tmp_path, "train").write_text("a.txt", "A")
    with pytest.raises(OutDirError, match="holds clex train output, not eval"):
        outdir.claim(tmp_path, "eval")
    assert (tmp_path / "a.txt").read_text() == "A"
    assert outdir.claim(tmp_path, "eval", overwrite=True).kind == "eval" and not (tmp_path / "a.txt").exists()


def test_a_damaged_manifest_is_refused_and_nothing_is_removed(tmp_path):
    outdir.claim(tmp_path, "eval").write_text("a.txt", "A")
    (tmp_path / outdir.MANIFEST).write_text('{"clex_manifest": 2, "kind": "eval", "entries": {"../x": {}}}')
    with pytest.raises(OutDirError, match="is not a clex manifest"):
        outdir.claim(tmp_path, "eval", overwrite=True)
    assert (tmp_path / "a.txt").read_text() == "A"


def test_an_output_inside_the_model_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for inside in (model, model / "out", model / "a" / "b"):
        with pytest.raises(OutDirError, match="is the model directory .* or inside it"):
            outdir.check_outside(inside, model)
    outdir.check_outside(tmp_path / "sibling", model)
    outdir.check_outside(tmp_path / "model-out", model)  # a name that merely starts like the model's
    outdir.check_outside(model / "out", None)
    outdir.check_outside(model / "out", "org/hub-model")  # a hub name is no directory to protect
    with pytest.raises(OutDirError, match="`--out` .* or inside it"):
        outdir.claim(model / "out", "eval", source=model, flag="`--out`")
    assert listing(model) == []


def test_an_output_reached_through_a_link_into_the_model_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(OutDirError, match="or inside it"):
        outdir.check_outside(tmp_path / "link" / "out", model)


# --- model fingerprints -----------------------------------------------------------------------------------
def test_the_fingerprint_follows_the_content_of_a_model_directory(tmp_path):
    model = save_llama(tmp_path / "model", num_hidden_layers=1)
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first == model_fingerprint(str(model))
    config = (model / "config.json").read_bytes()
    (model / "config.json").write_bytes(config)  # the same bytes again (a new mtime)
    (model / ".clex-lock").write_text("{}")  # hidden files are not the model
    assert model_fingerprint(model) == first
    changed = bytearray(config)
    changed[config.index(b'"num_hidden_layers": 1')] ^= 1  # one byte of a small file
    (model / "config.json").write_bytes(bytes(changed))
    assert model_fingerprint(model) != first
    (model / "config.json").write_bytes(config)
    assert model_fingerprint(model) == first
    (model / "notes.txt").write_text("a file added")
    assert model_fingerprint(model) != first


def test_the_fingerprint_of_weights_changes_with_one_byte(tmp_path):
    model = save_llama(tmp_path / "model", num_hidden_layers=1)
    first = model_fingerprint(model)
    weights = bytearray((model / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (model / "model.safetensors").write_bytes(bytes(weights))
    assert model_fingerprint(model) != first


def test_the_fingerprint_of_a_hub_name_is_the_name(tmp_path):
    assert model_fingerprint("HuggingFaceTB/SmolLM2-135M") == "name:HuggingFaceTB/SmolLM2-135M"
    assert model_fingerprint(tmp_path / "missing") == f"name:{tmp_path / 'missing'}"


def test_the_fingerprint_of_a_model_object_follows_its_weights():
    a, b = tiny_llama(num_hidden_layers=1), tiny_llama(num_hidden_layers=1)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.lm_head.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


# --- checkpoints ------------------------------------------------------------------------------------------
def _training(seed: int):
    model = tiny_llama(seed, num_hidden_layers=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return model, optimizer, scheduler


def _steps(model, optimizer, scheduler, n: int) -> None:
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


@pytest.fixture
def saved(tmp_path):
    model, optimizer, scheduler = _training(0)
    _steps(model, optimizer, scheduler, 2)
    torch.manual_seed(1234)
    C.save(tmp_path / "ckpt", model, optimizer, scheduler, step=2)
    rng = torch.get_rng_state()
    return tmp_path / "ckpt", (model, optimizer, scheduler), rng


def test_a_checkpoint_loads_back_the_weights_optimizer_scheduler_and_step(saved):
    path, (model, optimizer, scheduler), rng = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([*C.FILES, "rng-0.safetensors"])
    other, other_opt, other_sched = _training(1)
    torch.manual_seed(99)
    assert C.load(path, other, other_opt, other_sched) == 2
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    mine, theirs = optimizer.state_dict(), other_opt.state_dict()
    groups = [[{**g, "betas": tuple(g["betas"])} for g in sd["param_groups"]] for sd in (mine, theirs)]
    assert groups[0] == groups[1] and mine["param_groups"][0]["initial_lr"] == 1e-2
    assert mine["state"].keys() == theirs["state"].keys()
    for key, entries in mine["state"].items():
        for entry, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(theirs["state"][key][entry])), (key, entry)
    assert other_sched.last_epoch == 2 and other_sched.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(torch.get_rng_state(), rng)  # the generator as it was when saved
    _steps(model, optimizer, scheduler, 1)  # and training goes on identically from there
    _steps(other, other_opt, other_sched, 1)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_truncated_weight_file_is_named_as_damaged(saved):
    path = saved[0]
    data = (path / C.MODEL).read_bytes()
    (path / C.MODEL).write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFile, match=f"{C.MODEL} is not a readable safetensors file"):
        C.load(path, *_training(1))


@pytest.mark.parametrize(("name", "change", "message"), [
    (C.STATE_FILE, lambda text: text.replace("2", "3"), "is at step 2, the checkpoint at 3"),
    (C.STATE_FILE, lambda text: text[:-2], "trainer_state.json"),
    (C.OPTIM_META, lambda text: text.replace('"weight_decay": 0.1', '"weight_decay": 1e9'),
     "param group 0 has weight_decay = 1000000000.0"),
    (C.SCHED, lambda text: text.replace('"last_epoch": 2', '"last_epoch": 7'), "is at step 7, the checkpoint at 2"),
])
def test_a_changed_state_file_is_named_as_damaged(saved, name, change, message):
    path = saved[0]
    text = (path / name).read_text()
    assert change(text) != text
    (path / name).write_text(change(text))
    other = _training(1)
    before = [p.detach().clone() for p in other[0].parameters()]
    with pytest.raises(DamagedFile, match=message):
        C.load(path, *other)
    assert all(torch.equal(a, b) for a, b in zip(before, other[0].parameters(), strict=True))  # nothing loaded


def test_a_missing_file_is_named(saved):
    path = saved[0]
    (path / C.OPTIM).unlink()
    with pytest.raises(DamagedFile, match=f"{C.OPTIM} is missing"):
        C.load(path, *_training(1))


# --- finished runs ----------------------------------------------------------------------------------------
def _run(path, state: dict, config: bool = True):
    run = outdir.claim(path, "train")
    if config:
        run.write_text("config.json", "{}")
    run.write_text("trainer_state.json", json.dumps(state))
    return run


def test_finished_needs_a_final_state_and_a_model_that_clex_wrote(tmp_path):
    _run(tmp_path / "done", {"step": 3, "final": True})
    assert finished(tmp_path / "done") and finished(tmp_path / "done", 3)
    assert not finished(tmp_path / "done", 4)  # finished, but at another number of steps
    _run(tmp_path / "going", {"step": 3})
    assert not finished(tmp_path / "going")
    _run(tmp_path / "no-model", {"step": 3, "final": True}, config=False)
    assert not finished(tmp_path / "no-model")
    _run(tmp_path / "bad-step", {"step": 0, "final": True})
    assert not finished(tmp_path / "bad-step")
    assert not finished(tmp_path / "missing")


def test_a_state_that_clex_did_not_write_is_not_finished(tmp_path):
    _run(tmp_path / "edited", {"step": 3})
    (tmp_path / "edited" / "trainer_state.json").write_text(json.dumps({"step": 3, "final": True}))
    assert not finished(tmp_path / "edited")
    plain = tmp_path / "plain"  # the same files without a manifest
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    (plain / "trainer_state.json").write_text(json.dumps({"step": 3, "final": True}))
    assert not finished(plain)
