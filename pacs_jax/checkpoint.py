"""Orbax checkpoints of the train state: async saves, retention, restores onto a mesh, and
falling back past a corrupt latest step.

A step directory holds two items: `state` (any pytree of arrays: params + optimizer state,
sharded or not, written by every process for its own shards) and `meta` (JSON: data-stream
position, RNG key as a list of ints, config, metrics; written once, by the primary process).

Crash safety comes from Orbax: a step is written into `<step>.orbax-checkpoint-tmp` (or,
on GCS, committed by a `commit_success.txt` marker) and only then becomes a step, and old
steps are garbage-collected by the save's finalize thread *after* that save has committed,
so a failed or interrupted save never removes the last good checkpoint (tests check both).

Directories may be local paths (relative ones are resolved against the working directory
here, because Orbax refuses relative paths) or `gs://...`; they go to Orbax as
`etils.epath.Path`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

logger = logging.getLogger(__name__)

STATE = "state"
META = "meta"
QUARANTINE_DIR = "corrupt"  # bad steps are moved here: not an integer name, so Orbax ignores it


class Restored(NamedTuple):
    step: int
    train_state: Any
    meta: dict


def jsonable(value: Any, where: str = "meta") -> Any:
    """`value` with numpy / jax scalars and arrays turned into Python numbers and lists.

    Raises TypeError naming the offending entry (e.g. `meta['rng']`) for anything JSON
    cannot hold, before any file is written.
    """
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}; convert it with str()")
            out[key] = jsonable(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            raise TypeError(f"{where}: a typed PRNG key; store jax.random.key_data(key).tolist()")
        return np.asarray(value).tolist()
    raise TypeError(
        f"{where}: {type(value).__name__} is not JSON-serialisable; store numbers, strings, "
        "lists or dicts (e.g. an RNG key as jax.random.key_data(key).tolist())"
    )


def checkpoint_path(path: str | epath.PathLike) -> epath.Path:
    """`path` as Orbax accepts it: `gs://...` and other URLs unchanged, local paths absolute.

    Every place that opens a checkpoint goes through here, so a relative `trainer.run_dir`,
    `--checkpoint runs/x/checkpoints` or a sweep's `run_root` work from any caller.
    """
    text = str(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def abstract_like(tree: Any) -> Any:
    """Shape, dtype and sharding of every array leaf (jax.ShapeDtypeStruct); other leaves as is."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Saves and restores (train_state, meta) by step under one directory.

    Retention: the `keep_last` newest steps, plus every step divisible by `keep_every`
    (0 = off). `save` writes only steps divisible by `save_every` unless `force=True`, and
    always when a preemption notice has arrived (Orbax's preemption policy; check
    `reached_preemption(step)` to stop after such a save). Every process must call `save`
    and `restore` (Orbax synchronises them).
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        keep_last: int = 3,
        keep_every: int = 0,
        async_save: bool = True,
        save_every: int = 1,
    ):
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1 (trainer.keep_last), got {keep_last!r}")
        if not isinstance(keep_every, int) or keep_every < 0:
            raise ValueError(f"keep_every must be an integer >= 0, 0 = off (trainer.keep_every), got {keep_every!r}")
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be an integer >= 1, got {save_every!r}")
        self.directory = checkpoint_path(directory)
        keep: list = [policies.LatestN(n=keep_last)]
        if keep_every:
            keep.append(policies.EveryNSteps(interval_steps=keep_every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
            ),
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, META))

    # ------------------------------------------------------------------ saving

    def save(self, step: int, train_state: Any, meta: dict, force: bool = False) -> bool:
        """Start saving `step` (returns once arrays are copied off the devices when async).

        Returns whether a save was started. Raises if the previous async save failed (its
        error surfaces here or in `wait`), if `step` already exists, or if `meta` is not JSON.
        """
        meta = jsonable(meta)
        if not force and not self._manager.should_save(step):
            return False  # without waiting, so the in-flight async write overlaps training
        self.wait()
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(train_state), META: ocp.args.JsonSave(meta)}
            ),
            force=force,
        )

    def wait(self) -> None:
        """Block until the in-flight save has committed (and old steps are collected).

        Re-raises a failed background save's error once; the step list is re-read from
        the directory so a failed step never shows up in `all_steps`.
        """
        try:
            self._manager.wait_until_finished()
        except Exception:
            self._manager.reload()
            raise

    def reached_preemption(self, step: int) -> bool:
        return self._manager.reached_preemption(step)

    # ------------------------------------------------------------------ listing

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # ------------------------------------------------------------------ restoring

    def restore(self, target: Any = None, step: int | None = None) -> tuple[Any, dict]:
        """Return (train_state, meta) of `step` (default: the latest).

        `target` gives structure, dtype and sharding: jax.ShapeDtypeStruct leaves with
        `sharding=` or concrete arrays (their shardings are used, their values ignored).
        None restores with the shardings recorded in the checkpoint, which only works on the
        same device topology.
        """
        step = self._existing_step(step)
        state_args = ocp.args.StandardRestore(None if target is None else abstract_like(target))
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{STATE: state_args, META: ocp.args.JsonRestore()})
        )
        return restored[STATE], restored[META]

    def restore_part(self, target: Any, step: int | None = None) -> Any:
        """Only the arrays `target` names, a part of the saved tree at the same paths (e.g. a
        train state's policy parameters: {"train": {"params": {"policy": ...}}}), placed as its
        leaves say (as in `restore`); nothing else is read. The latest step by default."""
        step = self._existing_step(step)
        target = abstract_like(target)
        state_args = ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
        )
        return self._manager.restore(step, args=ocp.args.Composite(**{STATE: state_args}))[STATE]

    def _existing_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {self.all_steps()}"
            )
        return step

    def restore_latest_good(self, target: Any = None) -> Restored | None:
        """Restore the newest step that reads back whole; None when there is no checkpoint.

        Each step that fails (truncated or missing files) is logged as a WARNING naming it,
        and moved to `<directory>/corrupt/` once an older step has restored, so training can
        write that step number again. If checkpoints exist but none restores (typically: the
        target's structure no longer matches, e.g. a changed model config) this raises
        instead of silently starting over.
        """
        bad: list[int] = []
        last_error: Exception | None = None
        for step in reversed(self.all_steps()):
            try:
                train_state, meta = self.restore(target, step)
            except Exception as error:  # noqa: BLE001 -- any read failure means "try the previous step"
                logger.warning(
                    "checkpoint step %d in %s does not restore (%s: %s); trying the previous one",
                    step, self.directory, type(error).__name__, _first_line(error),
                )
                bad.append(step)
                last_error = error
                continue
            if bad:
                self._quarantine(bad)
            return Restored(step, train_state, meta)
        if bad:
            raise RuntimeError(
                f"none of the checkpoints in {self.directory} (steps {sorted(bad)}) restores; last error: "
                f"{type(last_error).__name__}: {_first_line(last_error)}. If the model or optimizer changed "
                "since they were written, start a fresh run directory (trainer.run_dir), or set "
                "trainer.resume=never to start over here (the earlier checkpoints and logs are moved "
                "into folders named replaced-<time>, nothing is deleted)."
            ) from last_error
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Move unreadable steps aside (primary process only), then re-read the step list."""
        if jax.process_index() == 0:
            quarantine = self.directory / QUARANTINE_DIR
            quarantine.mkdir(parents=True, exist_ok=True)
            for step in steps:
                source = self.directory / str(step)
                destination = quarantine / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
                source.rename(destination)
                logger.warning("moved unreadable checkpoint step %d to %s", step, destination)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("pacs_jax_checkpoint_quarantine")
        self._manager.reload()

    def move_aside(self, name: str) -> epath.Path | None:
        """Move every step into `<directory>/<name>/`, where Orbax no longer lists them (a name
        that is not an integer), so a new run can start at step 0 without deleting anything.
        Returns that folder, or None when there was no step. Every process must call it."""
        steps = self.all_steps()
        if not steps:
            return None
        self.wait()
        aside = self.directory / name
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                (self.directory / str(step)).rename(aside / str(step))
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("pacs_jax_checkpoint_move_aside")
        self._manager.reload()
        return aside

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Wait for the in-flight save and release Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


# ---------------------------------------------------------------------- one-shot helpers


def save_pytree(path: str | epath.PathLike, tree: Any, overwrite: bool = False) -> None:
    """Write one pytree of arrays to `path` (an Orbax checkpoint directory) and wait for it."""
    path = checkpoint_path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (or choose another output path)")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree, force=overwrite)
        checkpointer.wait_until_finished()


def load_pytree(path: str | epath.PathLike, target: Any = None) -> Any:
    """Read a pytree written by `save_pytree`; `target` as in `Checkpointer.restore`."""
    path = checkpoint_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Orbax checkpoint at {path}")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, None if target is None else abstract_like(target))


__all__ = [
    "Checkpointer",
    "Restored",
    "abstract_like",
    "checkpoint_path",
    "jsonable",
    "load_pytree",
    "save_pytree",
]
