"""clex.training: CLEX's step inside transformers' Trainer and TRL's SFTTrainer, shared with `clex train`."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import clex
from clex import data as D
from clex.training import CLEXTrainer
from clex.training.loop import batch_indices, pack, train
from clex.training.options import TrainConfig
from clex.training.trainer import CLEXDataCollator
from tiny import save_llama

L = 32
STEPS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    save_llama(root / "base", max_position_embeddings=L)
    rng = np.random.default_rng(0)
    words = ["the", "state", "of", "union", "is", "strong", "congress", "people", "nation", "peace"]
    (root / "corpus.txt").write_text(" ".join(rng.choice(words, 3000)))
    return root


def clex_model(root, method="clex:max_factor=4"):
    torch.manual_seed(0)  # as `clex train --seed 0` before it loads the model: the same CLEX W_up init
    return clex.apply(clex.from_pretrained(root / "base", attn_implementation="sdpa"), method)


def rows_in_clex_order(root, steps: int, batch: int, seed: int = 0) -> list[dict]:
    """The samples `clex train` takes, in the order it takes them."""
    tok = D.load_tokenizer("bytes")
    samples = pack(D.tokenize_documents(D.load_documents(str(root / "corpus.txt")), tok), L, None)
    order = np.concatenate([batch_indices(len(samples), s, batch, seed) for s in range(steps)])
    return [{"input_ids": torch.as_tensor(samples[i], dtype=torch.long)} for i in order]


class Recording(CLEXTrainer):
    """Records each micro-batch's loss at full precision, and takes the data in the given order."""

    losses: list

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        self.losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
        return loss


def trainer_args(out, **kw) -> tf.TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=3e-3,
                lr_scheduler_type="cosine", warmup_steps=0.25, weight_decay=0.0, max_grad_norm=1.0, seed=0,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                disable_tqdm=True)
    return tf.TrainingArguments(**{**base, **kw})


def run_trainer(root, out, model=None, resume=None, **kw):
    model = model or clex_model(root)
    trainer = Recording(model=model, args=trainer_args(out, **kw), train_dataset=rows_in_clex_order(root, STEPS, 4),
                        data_collator=CLEXDataCollator(model, seed=0), clex_lr=1e-2)
    trainer.losses = []
    trainer.train(resume_from_checkpoint=resume)
    return trainer


# --- the collator ---------------------------------------------------------------------------------------
def test_collator_positions_end_at_L_t_minus_1_and_t_is_uniform(setup):
    model = clex_model(setup, "clex:max_factor=8").train()
    collator = CLEXDataCollator(model, seed=3)
    rows = [{"input_ids": torch.arange(L) % 256} for _ in range(2)]
    draws = []
    for _ in range(800):
        batch = collator(rows)
        pos, t = batch["position_ids"], collator.last_t
        assert pos.shape == (2, L) and torch.equal(pos[0], pos[1])
        assert pos[0, 0] == 0 and pos[0, -1] == L * t - 1 and bool((pos[0].diff() > 0).all())
        assert torch.equal(batch["attention_mask"], torch.ones(2, L, dtype=torch.long))
        draws.append(t)
    counts = Counter(draws)
    expected = len(draws) / 8
    chi2 = sum((counts.get(t, 0) - expected) ** 2 / expected for t in range(1, 9))
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001
    model.eval()
    assert set(collator(rows)) == {"input_ids", "labels"}  # outside training: untouched


def test_collator_draws_what_clex_train_draws_and_accumulates_one_t_per_step(setup):
    from clex.training.step import step_positions

    model = clex_model(setup).train()
    collator = CLEXDataCollator(model, seed=5, layout="chunks", grad_accum=2)
    rows = [{"input_ids": torch.arange(L)}]
    for step in range(6):
        for _ in range(2):
            batch = collator(rows)
            t, pos = step_positions("chunks", 2, L, L, 4, 5, step)
            assert collator.last_t == t and torch.equal(batch["position_ids"][0], pos)


def test_packed_rows_get_per_segment_positions_a_block_mask_and_a_fixed_t(setup):
    model = clex_model(setup).train()
    collator = CLEXDataCollator(model, seed=0)
    # TRL's padding-free layout: one flattened row, positions restarting per sequence, no attention mask
    batch = collator([{"input_ids": torch.arange(20), "position_ids": torch.cat([torch.arange(12), torch.arange(8)]),
                       "labels": torch.arange(20), "cu_seq_lens_q": torch.tensor([0, 12, 20])}])
    assert "cu_seq_lens_q" not in batch and batch["clex_t"] == collator.last_t
    mask = batch["attention_mask"][0, 0]
    assert not mask[12:, :12].any() and mask[:12, :12].equal(torch.ones(12, 12, dtype=torch.bool).tril())
    pos = batch["position_ids"][0]
    assert pos[0] == 0 and pos[12] == 0 and pos[11] == 12 * collator.last_t - 1


# --- the Trainer ----------------------------------------------------------------------------------------
def test_trainer_takes_the_steps_of_clex_train(setup, tmp_path):
    out = train(TrainConfig(model=str(setup / "base"), out=str(tmp_path / "cli"), method="clex:max_factor=4",
                            data=str(setup / "corpus.txt"), tokenizer="bytes", steps=STEPS, batch_size=4, lr=3e-3,
                            clex_lr=1e-2, warmup=0.25, show_progress=False))
    reference = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    before = clex_model(setup).state_dict()
    trainer = run_trainer(setup, tmp_path / "hf")
    assert trainer.losses == pytest.approx(reference, abs=1e-5, rel=1e-5)
    assert np.mean(trainer.losses[-3:]) < np.mean(trainer.losses[:3])
    after = trainer.model.state_dict()
    assert not torch.equal(before["model.rotary_emb.clex_ode.up_proj"], after["model.rotary_emb.clex_ode.up_proj"])
    assert after["model.rotary_emb.clex_ode.up_proj"].dtype == torch.float32
    final = load_file(out / "model.safetensors")
    for key, value in final.items():
        torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-5)
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0


@pytest.mark.slow
def test_a_trainer_checkpoint_resumes_to_the_same_weights(setup, tmp_path):
    full = run_trainer(setup, tmp_path / "full")
    out = tmp_path / "stopped"
    run_trainer(setup, out, save_strategy="steps", save_steps=6, max_steps=STEPS)
    resumed = run_trainer(setup, out, resume=str(out / "checkpoint-6"), save_strategy="steps", save_steps=6)
    assert resumed.losses == pytest.approx(full.losses[6:], abs=1e-6)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)


def test_lora_through_peft_keeps_clex_trainable_and_saves_it(setup, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(clex_model(setup), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    before = clex.clex_modules(model)[0].clex_ode.up_proj.detach().clone()
    trainer = run_trainer(setup, tmp_path / "lora", model=model, max_steps=4)
    trainer.save_model(str(tmp_path / "lora-final"))
    after = clex.clex_modules(model)[0].clex_ode.up_proj.detach()
    assert not torch.equal(before, after)
    loaded = clex.from_pretrained(tmp_path / "lora-final")
    torch.testing.assert_close(clex.clex_modules(loaded)[0].clex_ode.up_proj, after)


# --- TRL ------------------------------------------------------------------------------------------------
def test_trl_sft_on_conversations_trains_assistant_tokens_and_saves_a_clex_model(setup, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from clex.data.chat import DEFAULT_TEMPLATE, render_text
    from clex.training import CLEXSFTTrainer

    convs = [{"messages": [{"role": "user", "content": f"what is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
             for i in range(16)]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(vocab_size=250, special_tokens=["<|end|>", "</s>", "<pad>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([render_text(c["messages"]) for c in convs], bpe)
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="<pad>")
    tok.chat_template = DEFAULT_TEMPLATE
    model = clex_model(setup)
    before = clex.clex_modules(model)[0].clex_ode.up_proj.detach().clone()
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=4,
                         learning_rate=3e-3, assistant_only_loss=True, report_to=[], save_strategy="no",
                         use_cpu=True, logging_steps=1, max_length=L * 4, disable_tqdm=True, seed=0)
    trainer = CLEXSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(convs), processing_class=tok,
                             clex_lr=1e-2)
    seen = []
    inner = trainer.data_collator.collator

    def spy(examples):
        batch = inner(examples)
        seen.append(batch)
        return batch

    trainer.data_collator.collator = spy
    trainer.train()
    labels, ids = seen[0]["labels"][0], seen[0]["input_ids"][0]
    learned = tok.decode(ids[labels != -100])
    assert "plus" in learned and "what is" not in learned  # assistant tokens only
    assert all(b["input_ids"].shape[1] <= 4 * L for b in seen)
    assert not torch.equal(before, clex.clex_modules(model)[0].clex_ode.up_proj.detach())
    trainer.save_model(str(tmp_path / "sft-final"))
    loaded = clex.from_pretrained(tmp_path / "sft-final")
    torch.testing.assert_close(clex.clex_modules(loaded)[0].clex_ode.up_proj,
                               clex.clex_modules(model)[0].clex_ode.up_proj)


# --- bf16 -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bf16_autocast_on_cpu_keeps_clex_fp32_with_finite_gradients_and_the_fp32_losses(setup, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(model=str(setup / "base"), out=str(tmp_path / precision), data=str(setup / "corpus.txt"),
                          method="clex:max_factor=16", tokenizer="bytes", steps=200, batch_size=2, lr=1e-3,
                          clex_lr=1e-3, warmup=0.1, precision=precision, show_progress=False)
        out = train(cfg)
        runs[precision] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        weights = load_file(out / "model.safetensors")
        assert weights["model.rotary_emb.clex_ode.up_proj"].dtype == torch.float32
    assert all(np.isfinite(r["grad_norm"]) for r in runs["bf16"])
    assert max(r["t"] for r in runs["bf16"]) == 16
    fp32, bf16 = (np.array([r["loss"] for r in runs[p]]) for p in ("fp32", "bf16"))
    assert np.max(np.abs(bf16 - fp32) / fp32) < 0.02  # measured here: 0.09% at most
    assert fp32[-20:].mean() < fp32[:20].mean()  # it trained


# --- FSDP -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_clex_trainer_under_fsdp_on_two_processes_takes_the_steps_of_one(setup, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    job = str(Path(__file__).parent / "fsdp_trainer_job.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(29540 + world), job, str(setup), str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[world] = json.loads((out / "result.json").read_text())
    assert runs[2]["fsdp"] and set(runs[2]["clex_param_types"].values()) == {"DTensor"}
    assert set(runs[2]["clex_dtypes"].values()) == {"torch.float32"}
    assert runs[2]["losses"] == pytest.approx(runs[1]["losses"], abs=1e-5)  # measured: 4.8e-7
    one, two = (load_file(tmp_path / f"world{w}" / "final" / "model.safetensors") for w in (1, 2))
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-5, atol=1e-5)  # measured: 6e-8
    assert two["model.rotary_emb.clex_ode.down_proj"].abs().sum() > 0  # CLEX trained (zero at init)
    clex.from_pretrained(tmp_path / "world2" / "final")
