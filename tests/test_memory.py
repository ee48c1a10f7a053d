"""No device holds more than its share: at every phase of a run (load, init, the first rollout,
the first update, a restore) with FSDP over all devices, the fullest device's live bytes are
within 1.15x of the mean (in this process, 8 devices), and a device's share shrinks with the
device count (2 vs 8 devices, in subprocesses). Before the weights went straight into their
shards, device 0 held the whole policy and then the Adam state: tests/memory_probe.py on 4 devices
at 7ae8fd2 measured load 4.99 / 0 / 0 / 0 MB and init 14.96 / 0 / 0 / 0 MB; now 1.25 MB and
3.74 MB on each device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import memory_probe  # noqa: E402

PHASES = ("load", "init", "rollout", "update", "restore")


def param_bytes() -> int:
    import jax
    import numpy as np
    from flax import nnx

    from pacs_jax.models import Decoder, DecoderConfig
    from pacs_jax.models.tokenizer import load_tokenizer

    config = DecoderConfig.from_hf({"model_type": "llama", "vocab_size": load_tokenizer("char", "").vocab_size, **memory_probe.ARCH})
    abstract = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))))
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def check_balanced(phases: dict, devices: int) -> None:
    for phase in PHASES:
        per_device = sorted(phases[phase].values())
        assert len(per_device) == devices
        mean = sum(per_device) / len(per_device)
        assert per_device[-1] <= 1.15 * mean, f"{phase}: fullest device {per_device[-1] / 1e6:.2f} MB, mean {mean / 1e6:.2f} MB"


@pytest.mark.slow
def test_every_phase_is_balanced_over_the_devices(tmp_path):
    """Weights from an HF folder (safetensors), in this process's 8 devices."""
    phases = memory_probe.phase_bytes(str(tmp_path / "run"), "hf")
    weights = param_bytes()
    totals = {phase: sum(per_device.values()) for phase, per_device in phases.items()}
    # The phases measured what they should: the policy at load, + Adam's two moments after init.
    assert totals["load"] >= weights and totals["init"] >= 3 * weights and totals["restore"] >= 3 * weights, (totals, weights)
    check_balanced(phases, 8)


def probe(tmp_path: Path, devices: int) -> dict:
    out = tmp_path / f"bytes_{devices}.json"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HERE / "memory_probe.py"), str(tmp_path / f"run_{devices}"), "arch", str(out)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=str(HERE.parent))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_a_device_share_shrinks_with_the_device_count(tmp_path):
    """A random init (model.arch), on 2 and on 8 devices in subprocesses."""
    two, eight = probe(tmp_path, 2), probe(tmp_path, 8)
    check_balanced(two, 2)
    check_balanced(eight, 8)
    for phase in PHASES:
        assert len(two[phase]) == 2 and len(eight[phase]) == 8
        fullest_2, fullest_8 = max(two[phase].values()), max(eight[phase].values())
        # Four times the devices, a quarter of the bytes each (what is replicated, a little more).
        assert fullest_8 <= 1.15 * fullest_2 / 4, f"{phase}: {fullest_2 / 1e6:.2f} MB on 2 devices, {fullest_8 / 1e6:.2f} MB on 8"
