"""Verifiers that misbehave on purpose, imported by VerifierPool workers in tests/test_rewards.py.

Each one behaves like an exact-match verifier except on the response that triggers it.
"""

import ctypes
import os
import signal
import time


def misbehaving(response: str, ground_truth: str) -> float:
    if response == "exit":
        os._exit(3)
    if response == "segfault":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    if response == "raise":
        raise ValueError("verifier bug")
    if response == "sleep":
        time.sleep(3600)
    if response == "spin":
        while True:
            pass
    if response == "deaf":
        # Blocks SIGALRM, as C code that never returns to Python would: only a kill stops it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(3600)
    if response == "nan":
        return float("nan")
    return 1.0 if response == ground_truth else 0.0
