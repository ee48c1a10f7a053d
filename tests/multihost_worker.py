"""One process of the two-process tests (tests/test_multihost.py), and the computations it runs.

    python tests/multihost_worker.py MODE PORT NUM_PROCESSES PROCESS_ID OUT_JSON [RUN_DIR]

joins a `jax.distributed` cluster on localhost:PORT, builds a mesh over every process's devices
and writes a JSON summary. MODE `update`: each process feeds its own slice of a deterministic
batch to one PACS update step; the summary holds the loss and parameter checksums. MODE `train`:
the trainer runs 2 RL steps into RUN_DIR (shared by the processes, as a bucket is on a pod),
then resumes from that checkpoint for a 3rd; the summary holds process 0's metrics and the
checksums of the step-3 checkpoint restored onto the mesh. The test imports `update_step_summary`
and `train_summary` to compute the same things in one process over 8 devices. The caller sets
XLA_FLAGS (device count) and JAX_PLATFORMS.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

MESH = (2, 2, 2)  # data x fsdp x tensor over 8 devices: each process holds half the batch
GROUP, PROMPTS, MINI_BATCHES = 4, 4, 2


def deterministic_batch() -> dict[str, np.ndarray]:
    """The same global batch on every process: 4 groups of 4 responses, each group mixed."""
    rng = np.random.default_rng(0)
    rows, prompt_len, response_len = PROMPTS * GROUP, 8, 6
    lengths = rng.integers(1, response_len + 1, rows)
    response_mask = (np.arange(response_len)[None, :] < lengths[:, None]).astype(np.int32)
    return {
        "prompt_ids": rng.integers(1, 64, (rows, prompt_len)).astype(np.int32),
        "prompt_mask": np.ones((rows, prompt_len), np.int32),
        "response_ids": (rng.integers(1, 64, (rows, response_len)) * response_mask).astype(np.int32),
        "response_mask": response_mask,
        "rewards": np.tile(np.array([1, 0, 0, 1], np.float32), PROMPTS),
    }


def update_step_summary() -> dict:
    """One PACS update on the global mesh; every process passes only its own rows."""
    import jax

    from pacs_jax import sharding
    from pacs_jax.config import AlgorithmConfig, MeshConfig, OptimizerConfig
    from pacs_jax.models import DecoderConfig, init_decoder
    from pacs_jax.update import ROLLOUT_KEYS, init_train_state, make_prepare_fn, make_train_optimizer, make_update_fn

    config = DecoderConfig.from_hf(dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, model_type="llama",
    ))
    algorithm = AlgorithmConfig(name="pacs")
    optimizer = make_train_optimizer(algorithm, OptimizerConfig(lr=1e-3, eps=1e-3), 10)
    mesh = sharding.make_mesh(MeshConfig(*MESH))
    sharding.validate_mesh_for_model(mesh, config, PROMPTS, GROUP, mini_batches=MINI_BATCHES)
    graphdefs, state = init_train_state(init_decoder(config, seed=0), optimizer, with_critic=False)
    state = sharding.shard_train_state(state, mesh)

    batch = deterministic_batch()
    first, last = sharding.process_slice(PROMPTS * GROUP, mesh)
    local = {name: rows[first:last] for name, rows in batch.items()}
    with jax.set_mesh(mesh):
        batch = sharding.shard_batch(local, mesh)
        extras = make_prepare_fn(graphdefs, algorithm)(state.params, None, {k: batch[k] for k in ROLLOUT_KEYS})
        update = make_update_fn(
            graphdefs, optimizer, algorithm, group_size=GROUP, mini_batches=MINI_BATCHES, micro_batches=1,
            state_sharding=sharding.train_state_shardings(state, mesh),
        )
        state, metrics = update(state, {**batch, **extras})
    return {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local_rows": [first, last],
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        **checksums(state.params, mesh),
    }


def checksums(params, mesh) -> dict[str, float]:
    """Sums over every parameter, reduced on the devices: a replicated result every process can read."""
    import jax
    import jax.numpy as jnp

    def reduce(params):
        leaves = jax.tree.leaves(params)
        return {
            "sum": sum(jnp.sum(x) for x in leaves),
            "sum_squares": sum(jnp.sum(x * x) for x in leaves),
            "weighted": sum(jnp.sum(x * jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))) for x in leaves),
        }

    with jax.set_mesh(mesh):
        return {name: float(value) for name, value in jax.jit(reduce)(params).items()}


# ------------------------------------------------------------------------------ trainer


def first_char_is_digit(response: str, ground_truth: str) -> float:
    """A verifier about half of an untrained model's responses pass, so groups are mixed."""
    return float(response[:1].isdigit())


def trainer_config(run_dir: str, total_steps: int):
    from pacs_jax.config import load_config

    return load_config(None, trainer_overrides(run_dir, total_steps))


def trainer_overrides(run_dir: str, total_steps: int) -> list[str]:
    """A tiny trainer config as `section.key=value` overrides (also given to `python -m pacs_jax train`)."""
    return [
        "model.tokenizer=char",
        "model.arch={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
        "num_key_value_heads: 2, tie_word_embeddings: true}",
        "data.train=synthetic:arithmetic",
        "data.prompt_template='{problem}='",
        "data.max_prompt_tokens=16",
        "data.synthetic_size=64",
        f"rollout.group_size={GROUP}",
        "rollout.max_new_tokens=6",
        "rollout.prompt_buckets=[16]",
        "reward.verifier=multihost_worker:first_char_is_digit",
        "reward.workers=1",
        f"trainer.prompts_per_step={PROMPTS}",
        f"trainer.mini_batches={MINI_BATCHES}",
        "trainer.tensorboard=false",
        "trainer.save_every=1",
        f"trainer.total_steps={total_steps}",
        f"trainer.run_dir={run_dir}",
        "optimizer.lr=1e-3",
        "optimizer.eps=1e-3",  # see tests/test_sharding.py: keeps Adam's first step smooth in g
        f"mesh.data={MESH[0]}", f"mesh.fsdp={MESH[1]}", f"mesh.tensor={MESH[2]}",
    ]


def train_summary(run_dir: str, stops: list[int]) -> dict:
    """Train to each of `stops` in turn (each call after the first resumes from the checkpoint),
    then restore the last step's train state onto the mesh through the Checkpointer."""
    import jax

    from pacs_jax import sharding
    from pacs_jax.checkpoint import Checkpointer
    from pacs_jax.models.tokenizer import load_tokenizer
    from pacs_jax.policy import load_policy
    from pacs_jax.train import train
    from pacs_jax.update import init_train_state, make_train_optimizer

    for total_steps in stops:
        outputs = train(trainer_config(run_dir, total_steps))
    config = trainer_config(run_dir, stops[-1])
    optimizer = make_train_optimizer(config.algorithm, config.optimizer, config.trainer.total_steps * config.trainer.mini_batches)
    _, state = init_train_state(load_policy(config, load_tokenizer("char", "")), optimizer, with_critic=False)
    mesh = sharding.make_mesh(config.mesh)
    with Checkpointer(outputs["checkpoints"], async_save=False) as checkpointer:
        restored, meta = checkpointer.restore({"train": sharding.shard_train_state(state, mesh)}, stops[-1])
    params = restored["train"].params["policy"]
    metrics_file = Path(run_dir) / "metrics.jsonl"
    return {
        "process": jax.process_index(),
        "step": outputs["step"],
        "meta_step": meta["step"],
        "q_proj_spec": list(params["layers"]["q_proj"][...].sharding.spec),
        "metrics": [json.loads(line) for line in metrics_file.read_text().splitlines()] if sharding.is_main_process() else None,
        **checksums(restored["train"].params, mesh),
    }


def main(argv: list[str]) -> None:
    mode, port, num_processes, process_id, out_path, *run_dir = argv
    from pacs_jax import sharding

    assert sharding.initialize_distributed(f"localhost:{port}", int(num_processes), int(process_id))
    if mode == "update":
        summary = update_step_summary()
    elif mode == "train":
        summary = train_summary(run_dir[0], [2, 3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    with open(out_path, "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(sys.argv[1:])
