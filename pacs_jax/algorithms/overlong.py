"""DAPO's treatment of responses that run into the length cap (Yu et al. 2025, section 3.4), as
host-side NumPy functions of a scored batch: the soft overlong punishment added to the rewards,
and which responses were truncated (the loss leaves those out with `algorithm.overlong_filter`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def overlong_penalty(lengths, max_new_tokens: int, buffer: int, penalty: float) -> np.ndarray:
    """DAPO's soft overlong punishment, [N] (add it to the rewards): 0 up to max_new_tokens -
    buffer tokens, then falling linearly to -penalty at max_new_tokens:
    min(0, -(length - (max_new_tokens - buffer)) / buffer * penalty), as verl's DAPO reward
    manager (overlong_buffer.len, .penalty_factor). buffer 0 = off (all zeros)."""
    lengths = np.asarray(lengths, np.float64)
    if not 0 <= buffer < max_new_tokens:
        raise ValueError(f"the overlong buffer must be in [0, max_new_tokens={max_new_tokens}), got {buffer}")
    if penalty < 0:
        raise ValueError(f"the overlong penalty is the reward taken at the cap, >= 0; got {penalty}")
    if buffer == 0:
        return np.zeros(lengths.shape, np.float32)
    excess = lengths - (max_new_tokens - buffer)
    return np.minimum(0.0, -excess / buffer * penalty).astype(np.float32)


def truncated_responses(response_ids, response_mask, max_new_tokens: int, stop_ids: Sequence[int]) -> np.ndarray:
    """[N] bool: the responses that reached max_new_tokens without ending in a stop token (a
    response whose stop token is its max_new_tokens-th token finished, and is not truncated)."""
    response_ids, response_mask = np.asarray(response_ids), np.asarray(response_mask)
    lengths = response_mask.sum(axis=1).astype(np.int64)
    last = response_ids[np.arange(len(lengths)), np.maximum(lengths - 1, 0)]
    return (lengths >= max_new_tokens) & ~np.isin(last, np.asarray(list(stop_ids), response_ids.dtype))
