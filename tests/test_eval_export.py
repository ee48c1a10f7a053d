"""Eval and export of a training checkpoint as at scale: a PPO run (policy, critic, its own
optimizer) trained with a relative run directory and a relative checkpoint_dir, then

- `restore_policy` with another config (PACS, other optimizer settings) reads the policy alone,
  sharded over the mesh, equal to the whole train state read with the run's own config;
- `eval --checkpoint` in two processes (one mesh over both) writes one set of files, from
  process 0 only (the processes run in different directories and --out is relative);
- `convert --from-run`, run from another directory, finds the checkpoints (the relative
  checkpoint_dir is resolved from where the run is) and writes an HF folder whose logits
  `transformers` computes equal to our restored policy's."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from test_multihost import free_port, wait_all  # noqa: E402

TINY = [
    "model.tokenizer=char",
    "model.arch={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1}",
    "data.prompt_template={problem}=", "data.max_prompt_tokens=16", "data.synthetic_size=32",
    "data.val={arith: 'synthetic:arithmetic?seed=3&size=8'}",
    "rollout.group_size=2", "rollout.max_new_tokens=6", "rollout.prompt_buckets=[16]",
    "reward.workers=1", "trainer.prompts_per_step=8", "trainer.mini_batches=1", "trainer.tensorboard=false",
    "eval.n_samples=2", "eval.max_new_tokens=6", "eval.prompts_per_batch=8",
    "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1",
]
PPO = ["algorithm.name=ppo", "optimizer.lr=3e-3", "trainer.total_steps=1"]


def cli(args: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "pacs_jax", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory) -> Path:
    """The directory training ran in; the run is runs/ppo, its checkpoints ckpts/ppo (both relative)."""
    root = tmp_path_factory.mktemp("ppo")
    cli(["train", "--config", "/dev/null", *TINY, *PPO, "trainer.run_dir=runs/ppo", "trainer.checkpoint_dir=ckpts/ppo"], cwd=root)
    assert (root / "ckpts" / "ppo" / "1").is_dir() and not (root / "runs" / "ppo" / "checkpoints").exists()
    return root


def test_restore_policy_reads_the_policy_alone_with_another_config(ppo_run):
    from flax import nnx

    from pacs_jax import sharding
    from pacs_jax.checkpoint import Checkpointer
    from pacs_jax.config import load_config
    from pacs_jax.policy import abstract_train_state, config_tokenizer, policy_config, restore_policy
    from pacs_jax.update import make_train_optimizer

    eval_config = load_config(None, [*TINY, "optimizer.lr=1e-5", "optimizer.weight_decay=0.5"])  # PACS, other optimizer
    mesh = sharding.make_mesh(eval_config.mesh)
    policy, _ = restore_policy(eval_config, str(ppo_run / "ckpts" / "ppo"), placement=mesh)
    assert policy.layers.q_proj[...].sharding.spec[1] == "fsdp"  # [layers, embed, heads, head_dim]: embed split 8 ways

    # The reference: the whole train state (policy, critic, Adam) read with the run's own config.
    run_config = load_config(str(ppo_run / "runs" / "ppo" / "config.yaml"))
    optimizer = make_train_optimizer(run_config.algorithm, run_config.optimizer, 1)
    _, abstract = abstract_train_state(policy_config(run_config, config_tokenizer(run_config)), optimizer, with_critic=True)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    with Checkpointer(str(ppo_run / "ckpts" / "ppo"), async_save=False) as checkpointer:
        state, _ = checkpointer.restore({"train": target}, 1)
    assert "critic" in state["train"].params
    whole = jax.tree.leaves(state["train"].params["policy"])
    ours = jax.tree.leaves(nnx.state(policy))
    assert len(whole) == len(ours) > 5
    for a, b in zip(whole, ours):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_on_two_processes_writes_once(ppo_run, tmp_path):
    """Two `eval` processes (4 devices each, one 8-device mesh), in different directories with a
    relative --out: the reports exist in process 0's directory only."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    env.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2", "PACS_JAX_SHARED_FS": "1"})
    args = [sys.executable, "-m", "pacs_jax", "eval", "--config", "/dev/null", "--checkpoint", str(ppo_run / "ckpts" / "ppo"),
            "--out", "eval_out", *TINY]
    procs, logs = [], []
    for i in range(2):
        (tmp_path / f"p{i}").mkdir()
        logs.append(tmp_path / f"p{i}.log")
        with open(logs[i], "w") as out:
            procs.append(subprocess.Popen(args, cwd=tmp_path / f"p{i}", env={**env, "JAX_PROCESS_ID": str(i)},
                                          stdout=out, stderr=subprocess.STDOUT))
    codes = wait_all(procs, timeout=600)
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], [t[-3000:] for t in texts]
    assert "pacs_jax: process 1 of 2, 4 of 8 devices here" in texts[1]
    metrics = json.loads((tmp_path / "p0" / "eval_out" / "eval_metrics.json").read_text())
    assert metrics["sources"]["arith"]["n_problems"] == 8
    assert len((tmp_path / "p0" / "eval_out" / "eval_rollouts.jsonl").read_text().splitlines()) == 8 * 2
    assert not (tmp_path / "p1" / "eval_out" / "eval_metrics.json").exists()
    assert "pass@1" in texts[0] and "pass@1" not in texts[1]


def test_convert_from_run_elsewhere_finds_relative_checkpoints(ppo_run, tmp_path):
    from pacs_jax.config import load_config
    from pacs_jax.policy import restore_policy

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cli(["convert", "--from-run", str(ppo_run / "runs" / "ppo"), "--to-hf", "export"], cwd=elsewhere)
    exported = transformers.LlamaForCausalLM.from_pretrained(elsewhere / "export").eval()
    config = load_config(str(ppo_run / "runs" / "ppo" / "config.yaml"))
    policy, _ = restore_policy(config, str(ppo_run / "ckpts" / "ppo"))
    ids = np.array([[3, 9, 14, 20, 7, 11]], np.int32)
    with torch.no_grad():
        theirs = exported(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(policy(jax.numpy.asarray(ids)))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
