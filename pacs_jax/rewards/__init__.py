"""Rewards: the maths verifiers (last \\boxed{} only, and the PACS authors' answer-anywhere
rule), the process pool that runs verifiers under time limits, and built-in synthetic tasks."""

from pacs_jax.rewards.math import has_boxed, last_boxed, score, score_authors
from pacs_jax.rewards.pool import VerifierError, VerifierPool, resolve_verifier

__all__ = ["VerifierError", "VerifierPool", "has_boxed", "last_boxed", "resolve_verifier", "score", "score_authors"]
