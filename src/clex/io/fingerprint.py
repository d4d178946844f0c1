"""The one fingerprint of a model: what a training run's identity and an evaluation's resume key compare.

A model directory is hashed by its resolved path and the content of every file in it (small files whole; large
weight files by size, mtime and their first and last MiB) and, for a LoRA adapter, its base model's; a model
object by its config and every tensor; a hub name by its name. A resume is refused when the fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

HASH_WHOLE = 4 << 20  # files up to this size are hashed whole; larger ones by size, mtime and their ends
HASH_ENDS = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file up to 4 MiB; beyond, of its size, mtime and first and last MiB (a safetensors file's
    header, which lists every tensor, is in its first bytes): reading 1 TB of weights is not worth it."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if stat.st_size <= HASH_WHOLE:
            digest.update(f.read())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            digest.update(f.read(HASH_ENDS))
            f.seek(-HASH_ENDS, os.SEEK_END)
            digest.update(f.read(HASH_ENDS))
    return digest.hexdigest()[:16]


def model_fingerprint(model, _depth: int = 0) -> str:
    """A hash of what a model's scores depend on: for a directory, every file in it (weights, config, CLEX
    and adapter files; see :func:`file_digest`) and, for a LoRA adapter, its base model's; for a model
    object, its config and every tensor of its state dict, whole; for a hub name, the name."""
    digest = hashlib.sha256()
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_dir():
            return f"name:{model}"
        digest.update(str(path.resolve()).encode())
        for item in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
            digest.update(f"{item.name}:{file_digest(item)}".encode())
        adapter = path / "adapter_config.json"
        if adapter.exists() and _depth == 0:
            from clex.adapters import adapter_base

            try:
                base = adapter_base(path)  # the base the loader will use
            except (OSError, ValueError):  # the model's loader names a bad adapter file
                base = None
            if base:
                digest.update(model_fingerprint(base, 1).encode())
        return digest.hexdigest()[:16]
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().reshape(-1).contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        try:
            digest.update(t.view(torch.uint8).cpu().numpy().tobytes())
        except (RuntimeError, TypeError):  # a tensor without plain bytes (meta, quantized): its sums
            digest.update(repr((float(t.float().sum()), float(t.float().abs().sum()))).encode())
    return digest.hexdigest()[:16]
