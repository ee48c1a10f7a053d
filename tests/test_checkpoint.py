"""Checkpointer: round trips onto a mesh, retention, corrupt-step fallback, failed saves."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pacs_jax.checkpoint import Checkpointer, jsonable, load_pytree, save_pytree

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    assert len(jax.devices()) == 8, "conftest sets 8 virtual CPU devices"
    return Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))


def host_tree(seed: int) -> dict:
    """Reference values as NumPy arrays (the independent side of every comparison)."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": rng.standard_normal((8, 16)).astype(np.float32),
            "emb": rng.standard_normal((16, 4)).astype(ml_dtypes.bfloat16),
        },
        "opt": {"count": np.array(seed * 7, np.int32), "ids": rng.integers(-5, 5, (12,)).astype(np.int32)},
    }


def shardings(mesh: Mesh) -> dict:
    return {
        "params": {"w": NamedSharding(mesh, P("data", "fsdp")), "emb": NamedSharding(mesh, P("fsdp", None))},
        "opt": {"count": NamedSharding(mesh, P()), "ids": NamedSharding(mesh, P("data"))},
    }


def place(tree: dict, placement: dict) -> dict:
    return jax.tree.map(jax.device_put, tree, placement)


def abstract(tree: dict, placement: dict) -> dict:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, placement)


def assert_tree_equal(restored: dict, reference: dict, placement: dict) -> None:
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(reference), jax.tree.leaves(placement)):
        assert got.dtype == want.dtype
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), want)
        for shard in got.addressable_shards:  # every device holds the right slice
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index])


def test_round_trip_sharded_mixed_dtypes_onto_target_shardings(tmp_path, mesh):
    reference = host_tree(1)
    meta = {
        "data_position": {"epoch": 2, "index": 517},
        "rng": jax.random.key_data(jax.random.key(3)),  # uint32 array -> list of ints
        "config": {"trainer": {"total_steps": 300, "run_dir": "runs/x"}, "mesh": {"data": -1}},
        "metrics": {"reward/mean": np.float32(0.25), "loss": -1.5},
    }
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.save(5, place(reference, shardings(mesh)), meta)
    expected_meta = {
        "data_position": {"epoch": 2, "index": 517},
        "rng": [int(v) for v in np.asarray(jax.random.key_data(jax.random.key(3)))],
        "config": {"trainer": {"total_steps": 300, "run_dir": "runs/x"}, "mesh": {"data": -1}},
        "metrics": {"reward/mean": 0.25, "loss": -1.5},
    }

    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.latest_step() == 5 and checkpointer.all_steps() == [5]
        # Abstract target with the saved shardings.
        state, got_meta = checkpointer.restore(abstract(reference, shardings(mesh)))
        assert_tree_equal(state, reference, shardings(mesh))
        assert got_meta == expected_meta
        assert isinstance(got_meta["rng"][0], int)
        # A different layout: the target decides where the values land.
        other_mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
        other = jax.tree.map(lambda _: NamedSharding(other_mesh, P()), reference)
        other["params"]["w"] = NamedSharding(other_mesh, P("fsdp", "data"))
        state, _ = checkpointer.restore(abstract(reference, other), step=5)
        assert_tree_equal(state, reference, other)
        # Concrete arrays as target: their shardings are used, their values ignored.
        zeros = place(jax.tree.map(np.zeros_like, reference), shardings(mesh))
        state, _ = checkpointer.restore(zeros)
        assert_tree_equal(state, reference, shardings(mesh))
        with pytest.raises(FileNotFoundError, match="available steps: \\[5\\]"):
            checkpointer.restore(zeros, step=4)


def brute_force_kept(steps: list[int], keep_last: int, keep_every: int) -> list[int]:
    return [s for s in steps if s in steps[-keep_last:] or (keep_every and s % keep_every == 0)]


@pytest.mark.parametrize("keep_last,keep_every,async_save", [(2, 3, True), (3, 0, False), (1, 4, True)])
def test_retention_keeps_last_n_and_every_kth(tmp_path, keep_last, keep_every, async_save):
    steps = list(range(1, 11))
    tree = {"x": np.zeros((4,), np.float32)}
    with Checkpointer(tmp_path, keep_last=keep_last, keep_every=keep_every, async_save=async_save) as checkpointer:
        for step in steps:
            checkpointer.save(step, {"x": tree["x"] + step}, {"step": step})
        checkpointer.wait()
        assert checkpointer.all_steps() == brute_force_kept(steps, keep_last, keep_every)
    on_disk = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    assert on_disk == brute_force_kept(steps, keep_last, keep_every)
    with Checkpointer(tmp_path) as checkpointer:  # the values belong to their steps
        state, meta = checkpointer.restore(tree, step=on_disk[0])
        np.testing.assert_array_equal(state["x"], np.full(4, on_disk[0], np.float32))
        assert meta == {"step": on_disk[0]}


def test_save_every_and_force(tmp_path):
    tree = {"x": np.ones(2, np.float32)}
    with Checkpointer(tmp_path, keep_last=10, save_every=3) as checkpointer:
        started = [checkpointer.save(step, tree, {}) for step in range(1, 8)]
        assert checkpointer.save(8, tree, {}, force=True)
        checkpointer.wait()
        assert started == [False, False, True, False, False, True, False]
        assert checkpointer.all_steps() == [3, 6, 8]


def test_relative_directories_work_like_the_default_run_dir(tmp_path, monkeypatch):
    """trainer.run_dir defaults to the relative runs/...; Orbax itself rejects relative paths."""
    monkeypatch.chdir(tmp_path)
    tree = {"x": np.arange(3, dtype=np.float32)}
    with Checkpointer("runs/x/checkpoints", save_every=1) as checkpointer:
        checkpointer.save(1, tree, {"step": 1})
        checkpointer.wait()
    assert (tmp_path / "runs" / "x" / "checkpoints" / "1").is_dir()
    with Checkpointer("runs/x/checkpoints") as checkpointer:
        restored, meta = checkpointer.restore({"x": jax.ShapeDtypeStruct((3,), np.float32)})
    np.testing.assert_array_equal(np.asarray(restored["x"]), tree["x"])
    assert meta["step"] == 1
    save_pytree("exported/model", tree)
    np.testing.assert_array_equal(np.asarray(load_pytree("exported/model")["x"]), tree["x"])


def corrupt_truncate(step_dir: Path) -> None:
    files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
    assert files, "Orbax's data files moved; update the corruption helper"
    for path in files:
        with open(path, "r+b") as f:
            f.truncate(10)


def corrupt_delete(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").unlink()


@pytest.mark.parametrize("corrupt", [corrupt_truncate, corrupt_delete])
def test_corrupt_latest_falls_back_with_warning(tmp_path, mesh, caplog, corrupt):
    placement = shardings(mesh)
    with Checkpointer(tmp_path, keep_last=3) as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save(step, place(host_tree(step), placement), {"step": step})
    corrupt(tmp_path / "3")

    with caplog.at_level(logging.WARNING, logger="pacs_jax.checkpoint"):
        with Checkpointer(tmp_path, keep_last=3) as checkpointer:
            restored = checkpointer.restore_latest_good(abstract(host_tree(0), placement))
            assert restored is not None and restored.step == 2
            assert_tree_equal(restored.train_state, host_tree(2), placement)
            assert restored.meta == {"step": 2}
            # The bad step is out of the way, so training can write step 3 again.
            assert checkpointer.all_steps() == [1, 2]
            assert checkpointer.save(3, place(host_tree(30), placement), {"step": 3})
            checkpointer.wait()
            state, _ = checkpointer.restore(abstract(host_tree(0), placement), step=3)
            assert_tree_equal(state, host_tree(30), placement)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint step 3" in message and "does not restore" in message for message in warnings)
    assert [p.name.split("-")[0] for p in (tmp_path / "corrupt").iterdir()] == ["3"]


def test_nothing_to_restore(tmp_path):
    with Checkpointer(tmp_path / "empty") as checkpointer:
        assert checkpointer.restore_latest_good({"x": np.zeros(2)}) is None
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            checkpointer.restore({"x": np.zeros(2)})
    # Checkpoints exist but none matches the target: a loud error, not a silent restart.
    with Checkpointer(tmp_path / "full") as checkpointer:
        checkpointer.save(1, {"x": np.zeros(2, np.float32)}, {})
    with Checkpointer(tmp_path / "full") as checkpointer:
        with pytest.raises(RuntimeError, match="trainer.run_dir"):
            checkpointer.restore_latest_good({"y": np.zeros(3, np.float32)})
        assert checkpointer.all_steps() == [1]  # nothing was moved aside


def test_failed_save_keeps_last_good(tmp_path):
    good = {"x": np.arange(6, dtype=np.float32)}
    with Checkpointer(tmp_path, keep_last=1) as checkpointer:
        checkpointer.save(1, good, {"step": 1})
        with pytest.raises(ValueError):  # a leaf Orbax cannot serialise
            checkpointer.save(2, {"x": good["x"], "bad": object()}, {"step": 2})
        checkpointer.wait()
        assert checkpointer.all_steps() == [1]
        state, meta = checkpointer.restore(good)
        np.testing.assert_array_equal(state["x"], good["x"])
        assert meta == {"step": 1}
        with pytest.raises(TypeError, match=r"meta\['rng'\]"):  # bad meta fails before any write
            checkpointer.save(2, good, {"rng": object()})
        # The next good save succeeds and only then retention removes step 1.
        checkpointer.save(3, {"x": good["x"] * 2}, {"step": 3})
        checkpointer.wait()
        assert checkpointer.all_steps() == [3]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3"]


CHILD = """
import os, sys
import numpy as np
from pacs_jax.checkpoint import Checkpointer
checkpointer = Checkpointer(sys.argv[1], keep_last=1, async_save=True)
checkpointer.save(2, {"x": np.arange(6, dtype=np.float32), "big": np.ones(2_000_000, np.float32)}, {"step": 2})
os._exit(0)  # the process dies (preemption) while the async write is still in flight
"""


def test_interrupted_async_save_keeps_last_good(tmp_path):
    good = {"x": np.arange(6, dtype=np.float32) + 100}
    with Checkpointer(tmp_path, keep_last=1) as checkpointer:
        checkpointer.save(1, good, {"step": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], check=True, env=env, timeout=120)

    assert not (tmp_path / "2").exists(), "the child's save finished; make its array bigger"
    with Checkpointer(tmp_path, keep_last=1) as checkpointer:
        assert checkpointer.all_steps() == [1]
        restored = checkpointer.restore_latest_good(good)
        assert restored.step == 1 and restored.meta == {"step": 1}
        np.testing.assert_array_equal(restored.train_state["x"], good["x"])
        assert checkpointer.save(2, good, {"step": 2})  # the half-written step is no obstacle


def test_jsonable_converts_and_names_bad_entries():
    converted = jsonable({"a": np.int64(3), "b": [np.float32(0.5), jnp.array([1, 2], jnp.uint32)], "c": None})
    assert converted == {"a": 3, "b": [0.5, [1, 2]], "c": None}
    assert type(converted["a"]) is int
    with pytest.raises(TypeError, match=r"meta\['x'\]\[1\]"):
        jsonable({"x": [1, {1, 2}]})
    with pytest.raises(TypeError, match="key_data"):
        jsonable({"key": jax.random.key(0)})


def test_save_and_load_pytree(tmp_path, mesh):
    reference = host_tree(4)
    save_pytree(tmp_path / "model", place(reference, shardings(mesh)))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_pytree(tmp_path / "model", reference)
    restored = load_pytree(tmp_path / "model", abstract(reference, shardings(mesh)))
    assert_tree_equal(restored, reference, shardings(mesh))
    save_pytree(tmp_path / "model", place(host_tree(5), shardings(mesh)), overwrite=True)
    assert_tree_equal(load_pytree(tmp_path / "model", abstract(reference, shardings(mesh))), host_tree(5), shardings(mesh))
    with pytest.raises(FileNotFoundError):
        load_pytree(tmp_path / "missing")


def test_bad_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="trainer.keep_last"):
        Checkpointer(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="trainer.keep_every"):
        Checkpointer(tmp_path, keep_every=-1)


WORKER = """
import os, sys
process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pacs_jax.checkpoint import Checkpointer
mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))  # 4 devices per process
reference = np.arange(64, dtype=np.float32).reshape(8, 8)
w = jax.make_array_from_callback(reference.shape, NamedSharding(mesh, P("data", "fsdp")), lambda i: reference[i])
with Checkpointer(directory, keep_last=2) as checkpointer:
    for step in (1, 2, 3):
        checkpointer.save(step, {"w": w * step}, {"step": step, "writer": process_id})
    checkpointer.wait()
    target = {"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=NamedSharding(mesh, P("fsdp", "data")))}
    restored = checkpointer.restore_latest_good(target)
    for shard in restored.train_state["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), (reference * 3)[shard.index])
    print("RESULT", checkpointer.all_steps(), restored.step, restored.meta, flush=True)
"""


def test_two_processes_save_shards_and_restore_on_one(tmp_path):
    """Two jax.distributed processes (4 CPU devices each) write one checkpoint of an array
    sharded over both; each restores its own shards, and one 8-device process reads it all."""
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = str(probe.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(i), port, str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in (0, 1)
    ]
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
        results = [line for line in output.splitlines() if line.startswith("RESULT")]
        # Retention ran once for both; the JSON meta was written by the primary process.
        assert results == ["RESULT [2, 3] 3 {'step': 3, 'writer': 0}"]

    mesh = Mesh(np.array(jax.devices()), ("data",))
    with Checkpointer(tmp_path) as checkpointer:
        target = {"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=NamedSharding(mesh, P(None, "data")))}
        state, meta = checkpointer.restore(target, step=2)
    np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(64, dtype=np.float32).reshape(8, 8) * 2)
    assert meta == {"step": 2, "writer": 0}


def test_move_aside_empties_the_step_list_and_keeps_every_step(tmp_path, mesh):
    placement = shardings(mesh)
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        assert checkpointer.move_aside("replaced-x") is None  # nothing to move
        for step in (0, 1):
            checkpointer.save(step, place(host_tree(step), placement), {"step": step}, force=True)
        aside = checkpointer.move_aside("replaced-x")
        assert checkpointer.all_steps() == [] and checkpointer.latest_step() is None
        # Step 0 can be written again (a new run), and the old steps still restore from their folder.
        checkpointer.save(0, place(host_tree(5), placement), {"step": 0}, force=True)
        assert checkpointer.all_steps() == [0]
    assert Path(aside) == tmp_path / "replaced-x"
    with Checkpointer(aside, async_save=False) as old:
        assert old.all_steps() == [0, 1]
        restored, meta = old.restore(abstract(host_tree(1), placement), 1)
    assert meta == {"step": 1}
    assert_tree_equal(restored, host_tree(1), placement)
