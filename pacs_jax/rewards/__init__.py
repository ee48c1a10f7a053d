"""Rewards: the maths verifier, the process pool that runs verifiers under time limits, and
built-in synthetic tasks."""

from pacs_jax.rewards.math import has_boxed, last_boxed, score
from pacs_jax.rewards.pool import VerifierError, VerifierPool, resolve_verifier

__all__ = ["VerifierError", "VerifierPool", "has_boxed", "last_boxed", "resolve_verifier", "score"]
