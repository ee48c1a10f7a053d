"""Live device memory of each phase of a real training run (tests/test_memory.py).

    python tests/memory_probe.py RUN_DIR MODEL OUT_JSON

trains a small model with FSDP over every device of this process (2 steps, then a resume for a
3rd) and writes, for each phase, the bytes each device holds at its end: `load` (the policy
read from an HF folder, or initialised, MODEL = "hf" / "arch"), `init` (+ optimizer state),
`rollout` and `update` (the first step's), `restore` (the resumed run's state). The phases are
the trainer's own functions, wrapped to measure after they return. The caller sets XLA_FLAGS
(the device count); the test imports `phase_bytes` to run it in its own process too.
"""

from __future__ import annotations

import json
import sys

# Big enough that the weights and the optimizer state dominate every phase's memory.
ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False)


def device_bytes(exclude: set[int]) -> dict[str, int]:
    """Bytes of every live array's shards on each device, arrays whose id is in `exclude` left out."""
    import gc

    import jax

    gc.collect()  # what is still referenced, not what awaits collection
    totals = {str(d): 0 for d in jax.devices()}
    seen = set()  # a global array's shards are live arrays too once read: each buffer counts once
    for array in jax.live_arrays():
        if id(array) in exclude:
            continue
        for shard in array.addressable_shards:
            buffer = (str(shard.device), shard.data.unsafe_buffer_pointer())
            if buffer not in seen:
                seen.add(buffer)
                totals[str(shard.device)] += shard.data.nbytes
    return totals


def hf_folder(path: str) -> str:
    """A Llama folder (config.json + model.safetensors) of ARCH with the char tokenizer's vocabulary."""
    from pacs_jax.models import DecoderConfig, init_decoder, save_pretrained
    from pacs_jax.models.tokenizer import load_tokenizer

    config = DecoderConfig.from_hf({"model_type": "llama", "vocab_size": load_tokenizer("char", "").vocab_size, **ARCH})
    save_pretrained(init_decoder(config, seed=3), path)
    return path


def overrides(run_dir: str, model: str, total_steps: int) -> list[str]:
    arch = "{" + ", ".join(f"{k}: {str(v).lower()}" for k, v in ARCH.items()) + "}"
    source = [f"model.path={hf_folder(run_dir + '_hf')}"] if model == "hf" else [f"model.arch={arch}"]
    return source + [
        "model.tokenizer=char",
        "data.train=synthetic:arithmetic",
        "data.prompt_template='{problem}='",
        "data.max_prompt_tokens=16",
        "data.synthetic_size=64",
        "rollout.group_size=2",
        "rollout.max_new_tokens=8",
        "rollout.prompt_buckets=[16]",
        "reward.workers=1",
        "trainer.prompts_per_step=8",
        "trainer.mini_batches=1",
        "trainer.tensorboard=false",
        "trainer.save_every=1",
        f"trainer.total_steps={total_steps}",
        f"trainer.run_dir={run_dir}",
        "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1",
    ]


def phase_bytes(run_dir: str, model: str) -> dict[str, dict[str, int]]:
    """{phase: {device: bytes}} of a 2-step run and its resume for a 3rd (see the module doc)."""
    import jax

    from pacs_jax import train as train_module
    from pacs_jax.config import load_config

    exclude = {id(a) for a in jax.live_arrays()}  # whatever the caller already holds
    keep_alive = list(jax.live_arrays())  # so those ids stay unique
    phases: dict[str, dict[str, int]] = {}
    originals = {}

    def measured(name: str, phase: str):
        original = getattr(train_module, name)
        originals[name] = original

        def wrapper(*args, **kwargs):
            out = original(*args, **kwargs)
            if phase not in phases:
                phases[phase] = device_bytes(exclude)
            return out

        setattr(train_module, name, wrapper)

    measured("load_policy", "load")
    measured("init_train_state", "init")
    measured("rollout", "rollout")
    measured("update", "update")
    try:
        train_module.train(load_config(None, overrides(run_dir, model, 2)))
        measured("build", "restore")
        outputs = train_module.train(load_config(None, overrides(run_dir, model, 3)))
    finally:
        for name, original in originals.items():
            setattr(train_module, name, original)
    del keep_alive
    assert outputs["step"] == 3 and set(phases) == {"load", "init", "rollout", "update", "restore"}, phases
    return phases


def main(argv: list[str]) -> None:
    run_dir, model, out = argv
    with open(out, "w") as f:
        json.dump(phase_bytes(run_dir, model), f)


if __name__ == "__main__":
    main(sys.argv[1:])
