"""One process of the two-process test (tests/test_multihost.py), and the computation it runs.

    python tests/multihost_worker.py update PORT NUM_PROCESSES PROCESS_ID OUT_JSON

joins a `jax.distributed` cluster on localhost:PORT, builds a mesh over every process's devices,
feeds its own slice of a deterministic batch to one PACS update step, and writes the loss and
parameter checksums as JSON. The test imports `update_step_summary` to compute the same thing
in one process over 8 devices. The caller sets XLA_FLAGS (device count) and JAX_PLATFORMS.
"""

from __future__ import annotations

import json
import sys

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
    import jax.numpy as jnp

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
        # Reduced on the devices: a replicated result every process can read.
        checksums = jax.jit(lambda params: {
            "sum": sum(jnp.sum(x) for x in jax.tree.leaves(params)),
            "sum_squares": sum(jnp.sum(x * x) for x in jax.tree.leaves(params)),
            "weighted": sum(jnp.sum(x * jnp.cos(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape)))
                            for x in jax.tree.leaves(params)),
        })(state.params)
    return {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local_rows": [first, last],
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        **{name: float(value) for name, value in checksums.items()},
    }


def main(argv: list[str]) -> None:
    mode, port, num_processes, process_id, out_path = argv
    from pacs_jax import sharding

    assert sharding.initialize_distributed(f"localhost:{port}", int(num_processes), int(process_id))
    if mode != "update":
        raise SystemExit(f"unknown mode {mode!r}")
    summary = update_step_summary()
    with open(out_path, "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(sys.argv[1:])
