"""CLEXTrainer over the processes it is launched on (FSDP2 when several): tests/test_training.py runs it."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import test_training as T  # noqa: E402
from clex.training.trainer import CLEXDataCollator  # noqa: E402

root, out = Path(sys.argv[1]), Path(sys.argv[2])
world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
model = T.clex_model(root)
sharded = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True,
           "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer", "CLEXRotary"]}} if world > 1 else {}
args = T.trainer_args(out, per_device_train_batch_size=4 // world, max_steps=6, **sharded)
trainer = T.Recording(model=model, args=args, train_dataset=T.rows_in_clex_order(root, 6, 4),
                      data_collator=CLEXDataCollator(model, seed=0), clex_lr=1e-2)
trainer.losses = []
trainer.train()
trainer.save_model(str(out / "final"))
if trainer.accelerator.is_main_process:
    logged = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    params = {n: type(p).__name__ for n, p in trainer.model.named_parameters() if "clex_ode" in n}
    dtypes = {n: str(p.dtype) for n, p in trainer.model.named_parameters() if "clex_ode" in n}
    (out / "result.json").write_text(json.dumps({"losses": logged, "fsdp": trainer.is_fsdp_enabled,
                                                 "clex_param_types": params, "clex_dtypes": dtypes}))
torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None
