"""The first step's old-log-prob and update programs compiled on a second thread while the
rollout compiles and runs.

A step's programs run one after the other, but their inputs' shapes are known before the first
rollout starts (rows, prompt bucket, max_new_tokens), so nothing forces their compiles to wait
for it. XLA's compile releases the GIL, so the update traces, lowers and compiles while the
rollout does. On bench.step's workload (2 CPU cores, which XLA's compile already keeps busy) that
is about 0.3 s of a 6-8 s first step (bench/RESULTS.md); a TPU host has more cores to overlap on.

An ahead-of-time compile (`jit(f).lower(...).compile()`) fills the cache the jitted call later
reads only when the call's argument types are the same ones: same shapes, dtypes and sharding
objects, and the same mesh context (set on this thread too). `batch_arrays` gives the batch
arrays the sharding the abstract ones have, so the trainer calls the passes with exactly the
types compiled here. A packed batch's row count depends on the responses' lengths: those
passes are not compiled ahead.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from pacs_jax import sharding
from pacs_jax.update import ROLLOUT_KEYS

log = logging.getLogger("pacs_jax")


def batch_arrays(arrays: Mapping[str, jax.Array], mesh) -> dict[str, jax.Array]:
    """The arrays with the batch sharding (`sharding.batch_sharding`): rows over data x fsdp.
    Arrays already laid out that way (the rollout's) keep their buffers; only the sharding
    object changes, which is part of a compiled program's cache key."""
    return jax.device_put(dict(arrays), sharding.batch_sharding(mesh))


def rollout_types(rows: int, prompt_width: int, max_new_tokens: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The rollout arrays (ROLLOUT_KEYS) as the passes receive them, after `batch_arrays`."""
    spec = sharding.batch_sharding(mesh)
    shapes = {"prompt_ids": prompt_width, "prompt_mask": prompt_width, "response_ids": max_new_tokens, "response_mask": max_new_tokens}
    return {k: jax.ShapeDtypeStruct((rows, shapes[k]), jnp.int32, sharding=spec) for k in ROLLOUT_KEYS}


class CompileAhead:
    """Compiles `prepare(params, reference, rollout)` and then `update(state, batch)` on a worker
    thread, for the types the first step will call them with. Call `wait_prepare()` /
    `wait_update()` before calling each: a call made while its program is still compiling here
    would compile it a second time."""

    def __init__(self, prepare, update, state, reference, *, rows: int, prompt_width: int, max_new_tokens: int, mesh):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile-ahead")
        rollout = rollout_types(rows, prompt_width, max_new_tokens, mesh)

        def in_mesh(compile_fn: Callable):
            def run():
                with jax.set_mesh(mesh):  # the context is per thread, and part of the cache key
                    return compile_fn()
            return run

        def compile_prepare():
            return prepare.lower(state.params, reference, rollout).compile()

        def compile_update():
            extras = self._prepare.result().out_info
            logprobs = jax.ShapeDtypeStruct((rows, max_new_tokens), jnp.float32, sharding=sharding.batch_sharding(mesh))
            batch = {
                **rollout,
                **{k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=logprobs.sharding) for k, x in extras.items()},
                **{k: jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=logprobs.sharding) for k in ("rewards", "truncated")},
                "sampler_logprobs": logprobs,
            }
            return update.lower(state, batch).compile()

        self._prepare = self._pool.submit(in_mesh(compile_prepare))
        self._update = self._pool.submit(in_mesh(compile_update))
        self._pool.shutdown(wait=False)  # the thread ends when both are done

    def wait_prepare(self) -> None:
        _wait(self._prepare, "old-log-prob pass")

    def wait_update(self) -> None:
        _wait(self._update, "update")


def _wait(future: concurrent.futures.Future, name: str) -> None:
    # A failure here is only lost time: the call compiles the program itself, and raises what is
    # really wrong with it there.
    try:
        future.result()
    except Exception as error:  # noqa: BLE001
        log.warning("compiling the %s ahead of its first call failed (%s: %s); it compiles at the call",
                    name, type(error).__name__, error)
