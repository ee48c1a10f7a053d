"""Verifiers for tests: ones that misbehave on purpose, imported by VerifierPool workers in
tests/test_rewards.py, and a task an untrained tiny model half solves (first_char_even).

The misbehaving one behaves like an exact-match verifier except on the response that triggers it.
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


def first_char_even(response: str, ground_truth: str) -> float:
    """A task a random tiny model solves about half the time: the response's first character has an
    even code point. Groups of its rewards are sometimes all equal and sometimes not, which is what
    dynamic sampling's tests need (the arithmetic task's rewards are all 0 for an untrained model)."""
    return 1.0 if response and ord(response[0]) % 2 == 0 else 0.0
