"""XLA compiler options per backend, and `jit`, which applies them to the engines' programs.

On CPU (the debug mode, the tests, the benchmarks) a program's compile time is mostly LLVM, at
roughly 30 ms of CPU per fused kernel whatever its size, and the rollout and the update are
160-230 kernels each on the smallest model: compiling them is most of a short run's first step.
Two options cut that by about a third: LLVM at optimisation level 1 instead of 2, and XLA's
elemental kernel emitters instead of its MLIR fusion emitters, which put a program's kernels
into a few shared LLVM modules (for forward-only programs: see FAST_CPU_COMPILE). bench.step,
alternating runs: first step 8.1-10.9 s -> 6.5-8.6 s, steady steps within the run-to-run noise.
`trainer.cpu_compile: full` keeps XLA's defaults. TPU and GPU programs always get XLA's defaults.

The options are chosen when a program is first called, by the backend in use then (not at
import: a multi-host job initialises jax.distributed before any backend exists), or by
`target(...)` for programs compiled for another backend (`python -m pacs_jax compile` lowers
TPU programs on a CPU host).

`set_compile_cache` (`trainer.compile_cache`) turns on JAX's persistent compilation cache, so a
later run with the same shapes reads its programs back instead of compiling them again.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import jax

# Per kind of program. The elemental emitters cannot emit scatter: XLA expands it into a while
# loop of one row per iteration (the embedding gradient of 4352 tokens: ~20 ms per update), so
# programs with a backward pass keep the fusion emitters.
FAST_CPU_COMPILE = {
    "forward": {"xla_backend_optimization_level": 1, "xla_cpu_use_fusion_emitters": False},
    "backward": {"xla_backend_optimization_level": 1},
}
CPU_COMPILE_MODES = ("fast", "full")

_cpu_compile = "fast"
_target: str | None = None


# Programs that compile faster than this are not written to the cache (JAX's default: 1 s). The
# CPU rollout is several programs of 0.2-0.9 s each (the compacting engine's): at 1 s a rerun of
# the debug run read back only the update (first step 6.2 -> 2.5 s, the rollout's 2 s untouched).
CACHE_MIN_COMPILE_S = 0.2


def set_compile_cache(path: str) -> None:
    """`trainer.compile_cache`: JAX's persistent compilation cache in `path` ("" = off; "~"
    expands). Takes effect only before the process's first compile: JAX reads it once, then."""
    if not path:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path if "://" in path else os.path.expanduser(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # else the user's choice stands
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)


def set_cpu_compile(mode: str) -> None:
    """`trainer.cpu_compile`: "fast" (FAST_CPU_COMPILE) or "full" (XLA's defaults)."""
    global _cpu_compile
    if mode not in CPU_COMPILE_MODES:
        raise ValueError(f"trainer.cpu_compile must be one of {CPU_COMPILE_MODES}, got {mode!r}")
    _cpu_compile = mode


@contextlib.contextmanager
def target(backend: str):
    """Programs first called or lowered inside get the options of `backend`, not the default one's."""
    global _target
    previous, _target = _target, backend
    try:
        yield
    finally:
        _target = previous


def compiler_options(kind: str, backend: str | None = None) -> dict[str, Any] | None:
    """The options `jit` passes to XLA for a program of `kind` ("forward" or "backward") on
    `backend` (default: the target, else jax's default)."""
    backend = backend or _target or jax.default_backend()
    return dict(FAST_CPU_COMPILE[kind]) if backend == "cpu" and _cpu_compile == "fast" else None


class _Jit:
    """`jax.jit(fun, **kwargs)` with the compiler options of the backend in use at each call
    (one jitted function, with its own compile cache, per distinct set of options)."""

    def __init__(self, fun: Callable, kind: str, kwargs: dict):
        if kind not in FAST_CPU_COMPILE:
            raise ValueError(f"kind must be one of {tuple(FAST_CPU_COMPILE)}, got {kind!r}")
        self._fun, self._kind, self._kwargs, self._jitted = fun, kind, kwargs, {}
        functools.update_wrapper(self, fun)

    def _get(self):
        options = compiler_options(self._kind)
        key = tuple(sorted(options.items())) if options else ()
        if key not in self._jitted:
            self._jitted[key] = jax.jit(self._fun, compiler_options=options, **self._kwargs)
        return self._jitted[key]

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def lower(self, *args, **kwargs):
        return self._get().lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return self._get()._cache_size()


def jit(fun: Callable | None = None, /, *, kind: str, **kwargs):
    """`jax.jit` (same keyword arguments, usable as a decorator) with `compiler_options(kind)`:
    kind "forward" for programs without a backward pass (sampling, old log-probs), "backward"
    for those with one (the updates)."""
    if fun is None:
        return lambda f: _Jit(f, kind, kwargs)
    return _Jit(fun, kind, kwargs)


def backend() -> str:
    """The backend programs are being built for: the `target` set (compile for TPU on a CPU
    host), else jax's default."""
    return _target or jax.default_backend()
