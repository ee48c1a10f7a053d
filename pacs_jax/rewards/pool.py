"""Scores (response, ground truth) pairs in worker processes, each check under a hard time limit.

The trainer's process runs JAX (many threads), so workers come from a forkserver (spawn
where there is none), never from fork. Workers start once and are reused; one that hangs,
crashes or exits is killed and replaced, its item scores 0 and is counted. A check is
stopped in two steps: at `timeout_s` a SIGALRM in the worker interrupts Python-level work
(the worker survives); a worker still busy `KILL_GRACE_S` later (stuck in C code, e.g. a
huge integer power) is killed.

A dispatcher thread in the parent feeds the workers, so `submit` returns at once and the
trainer can collect the scores later with `future.result()`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import queue
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from pacs_jax.config import NAMED_VERIFIERS
from pacs_jax.rewards.math import has_boxed

KILL_GRACE_S = 1.0
_log = logging.getLogger(__name__)

Verifier = Callable[[str, str], float]


class VerifierError(RuntimeError):
    """The verifier cannot run at all (import failure, workers dying at start-up)."""


def resolve_verifier(spec: str) -> Verifier:
    """A name in `NAMED_VERIFIERS` ("math", "math_authors") or "package.module:function" -> the
    callable (imported here)."""
    spec = NAMED_VERIFIERS.get(spec, spec)
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise VerifierError(
            f"reward.verifier must be one of {sorted(NAMED_VERIFIERS)} or 'module:function', got {spec!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise VerifierError(
            f"reward.verifier {spec!r}: cannot import module {module_name!r} ({e}); "
            f"check the name and that it is on PYTHONPATH"
        ) from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise VerifierError(f"reward.verifier {spec!r}: module {module_name!r} has no function {function_name!r}")
    return function


# ---------------------------------------------------------------------------- worker side


class _SoftTimeout(BaseException):
    # BaseException so that verifiers' `except Exception` (math-verify has many) cannot
    # swallow it.
    pass


_armed = False


def _on_alarm(signum, frame):
    if _armed:
        raise _SoftTimeout()


def _check_one(verifier: Verifier, response: str, ground_truth: str, timeout_s: float | None) -> tuple[str, float, str]:
    global _armed
    try:
        try:
            if timeout_s is not None:
                _armed = True
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
            value = verifier(response, ground_truth)
        finally:
            if timeout_s is not None:
                _armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        value = float(value)
        if not math.isfinite(value):
            return "error", 0.0, f"verifier returned {value}"
        return "ok", value, ""
    except _SoftTimeout:
        return "timeout", 0.0, ""
    except Exception as e:  # a verifier bug must cost one item, not the worker
        return "error", 0.0, f"{type(e).__name__}: {e}"[:300]


def _worker_main(conn, verifier_spec: str, timeout_s: float, memory_limit_mb: int) -> None:
    # Ctrl-C goes to the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    soft_limit = hasattr(signal, "setitimer")  # not on Windows: the parent's kill is the only limit
    if soft_limit:
        signal.signal(signal.SIGALRM, _on_alarm)
    if memory_limit_mb > 0:
        try:
            import resource

            limit = memory_limit_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass  # not on this platform; the time limit still holds
    try:
        verifier = resolve_verifier(verifier_spec)
    except BaseException as e:
        conn.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready",))
    while True:
        message = conn.recv()
        if message is None:
            return
        batch_id, index, response, ground_truth = message
        status, value, detail = _check_one(verifier, response, ground_truth, timeout_s if soft_limit else None)
        conn.send(("result", batch_id, index, status, value, detail))


# ---------------------------------------------------------------------------- parent side


@dataclass(eq=False)  # workers are compared by identity
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    ready: bool = False
    item: int | None = None  # index (in the current batch) being checked
    sent_at: float = 0.0


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # Preloaded in the fork server, so each (re)started worker forks with
        # math-verify and sympy already imported instead of importing them for ~1 s.
        context.set_forkserver_preload(["pacs_jax.rewards.math"])
        return context
    return multiprocessing.get_context("spawn")


class VerifierPool:
    """Worker processes that run `verifier` on (response, ground_truth) pairs.

    Use as a context manager (or call `close()`); `score_batch` blocks, `submit` returns a
    `concurrent.futures.Future` of the same `(scores, stats)`.
    """

    def __init__(
        self,
        verifier: str = "math",
        workers: int = 2,
        timeout_s: float = 5.0,
        deadline_s: float = 300.0,
        memory_limit_mb: int = 4096,
    ):
        if workers < 1:
            raise ValueError(f"reward.workers must be >= 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {timeout_s}")
        if not deadline_s > 0:
            raise ValueError(f"reward.batch_deadline_s must be > 0, got {deadline_s}")
        resolve_verifier(verifier)  # fail here, with the name, rather than in every worker
        self.verifier = verifier
        self.timeout_s = float(timeout_s)
        self.deadline_s = float(deadline_s)
        self.memory_limit_mb = int(memory_limit_mb)
        self.restarts = 0  # total worker replacements over the pool's life
        self._context = _context()
        self._workers = [self._start_worker() for _ in range(workers)]
        self._jobs: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._batch_id = 0
        self._thread = threading.Thread(target=self._serve, name="verifier-pool", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, reward_config) -> "VerifierPool":
        """Build from a `pacs_jax.config.RewardConfig`."""
        return cls(
            verifier=reward_config.verifier,
            workers=reward_config.workers,
            timeout_s=reward_config.timeout_s,
            deadline_s=reward_config.batch_deadline_s,
            memory_limit_mb=getattr(reward_config, "memory_limit_mb", 4096),
        )

    # -- public API

    def submit(self, responses: Sequence[str], ground_truths: Sequence[str]) -> concurrent.futures.Future:
        """Queue a batch; the future's result is `(scores, stats)` in the order given."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        for name, values in (("responses", responses), ("ground_truths", ground_truths)):
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise TypeError(f"{name}[{bad}] is {type(values[bad]).__name__}, expected str")
        if self._closing.is_set():
            raise RuntimeError("VerifierPool is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((list(responses), list(ground_truths), future))
        return future

    def score_batch(self, responses: Sequence[str], ground_truths: Sequence[str]) -> tuple[list[float], dict]:
        """Scores in input order and stats: reward/timeouts, reward/errors, reward/format_ok, ..."""
        return self.submit(responses, ground_truths).result()

    def close(self) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._jobs.put(None)
        self._thread.join()
        for worker in self._workers:
            self._stop_worker(worker)

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- workers

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self.verifier, self.timeout_s, self.memory_limit_mb),
            name="verifier-worker",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Worker(process=process, conn=parent_conn)

    def _stop_worker(self, worker: _Worker, kill: bool = False) -> None:
        if not kill and worker.process.is_alive():
            try:
                worker.conn.send(None)
                worker.process.join(timeout=2.0)
            except (OSError, ValueError):
                pass
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.conn.close()

    def _replace(self, worker: _Worker) -> _Worker:
        self._stop_worker(worker, kill=True)
        fresh = self._start_worker()
        self._workers[self._workers.index(worker)] = fresh
        self.restarts += 1
        return fresh

    # -- dispatcher thread

    def _receive(self, worker: _Worker, batch_id: int, finish: Callable, block: bool = True) -> bool:
        """Handle one message from `worker`; False when its pipe is closed (or empty, non-blocking)."""
        try:
            if not block and not worker.conn.poll():
                return False
            message = worker.conn.recv()
        except (EOFError, OSError):
            return False
        kind = message[0]
        if kind == "ready":
            worker.ready = True
        elif kind == "init_error":
            raise VerifierError(f"reward.verifier {self.verifier!r} failed in a worker: {message[1]}")
        elif kind == "result" and message[1] == batch_id and message[2] == worker.item:
            _, _, _, status, value, detail = message
            finish(worker, status, value, detail)
        return True

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            responses, ground_truths, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(self._run_batch(responses, ground_truths))
            except BaseException as e:  # reported to whoever waits on the future
                future.set_exception(e)

    def _run_batch(self, responses: list[str], ground_truths: list[str]) -> tuple[list[float], dict]:
        start = time.monotonic()
        self._batch_id += 1
        batch_id = self._batch_id
        restarts_before = self.restarts
        n = len(responses)
        scores = [0.0] * n
        pending = collections.deque(range(n))
        unfinished = n
        counts = collections.Counter()
        deadline = start + self.deadline_s
        hard_limit = self.timeout_s + KILL_GRACE_S

        errors: list[str] = []

        def finish(worker: _Worker, status: str, value: float = 0.0, detail: str = "") -> None:
            nonlocal unfinished
            if detail:
                errors.append(detail)
            scores[worker.item] = value
            counts[status] += 1
            worker.item = None
            unfinished -= 1

        while unfinished:
            if self._closing.is_set():
                raise RuntimeError("VerifierPool was closed while a batch was being scored")
            now = time.monotonic()
            if now >= deadline:
                for worker in list(self._workers):
                    if worker.item is not None:
                        self._replace(worker)
                counts["deadline"] += unfinished
                break
            for worker in self._workers:
                if worker.ready and worker.item is None and pending:
                    index = pending.popleft()
                    try:
                        worker.conn.send((batch_id, index, responses[index], ground_truths[index]))
                    except (OSError, ValueError):
                        pending.appendleft(index)  # it died idle; its sentinel reports it below
                        continue
                    worker.item, worker.sent_at = index, now
            busy_until = [w.sent_at + hard_limit for w in self._workers if w.item is not None]
            wait_s = max(0.0, min([deadline, *busy_until]) - now)
            by_handle = {}
            for worker in self._workers:
                by_handle[worker.conn] = worker
                by_handle[worker.process.sentinel] = worker
            ready = multiprocessing.connection.wait(list(by_handle), timeout=min(wait_s, 1.0))
            dead = []
            for handle in ready:
                worker = by_handle[handle]
                if handle is worker.conn and self._receive(worker, batch_id, finish):
                    continue
                if worker not in dead:
                    dead.append(worker)
            for worker in dead:
                # A result it sent just before exiting still counts.
                while worker.item is not None and self._receive(worker, batch_id, finish, block=False):
                    pass
                if not worker.ready:
                    raise VerifierError(
                        f"a verifier worker exited during start-up (exit code {worker.process.exitcode}); "
                        f"reward.verifier={self.verifier!r}"
                    )
                if worker.item is not None:
                    errors.append(f"worker exited (exit code {worker.process.exitcode})")
                    finish(worker, "error")
                self._replace(worker)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.item is not None and now - worker.sent_at > hard_limit:
                    finish(worker, "timeout")
                    self._replace(worker)

        if errors:
            _log.warning("reward: %d verifier errors in a batch of %d; first: %s", counts["error"], n, errors[0])
        stats = {
            "reward/timeouts": float(counts["timeout"]),
            "reward/errors": float(counts["error"]),
            "reward/deadline_missed": float(counts["deadline"]),
            "reward/worker_restarts": float(self.restarts - restarts_before),
            "reward/format_ok": sum(has_boxed(r) for r in responses) / n if n else 0.0,
            "reward/check_s": time.monotonic() - start,
        }
        return scores, stats
