"""DAPO's dynamic sampling, host side (NumPy): which groups carry a learning signal, and one
batch of prompts_per_step groups assembled from several rounds of sampling.

A group whose rewards are all equal gives GRPO, RLOO, PPO (outcome reward, no critic baseline
difference within the group) and DAPO no advantage: DAPO drops such groups and samples more
prompts until the batch is full (Yu et al. 2025, Sec. 3.2; verl's `algorithm.filter_groups`).
PACS still learns from them (each response's label is its own reward), so its configs leave this off.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def varied_groups(scores: np.ndarray, group_size: int) -> np.ndarray:
    """[prompts] bool: whether the group's rewards are not all equal (DAPO's filter on the
    verifier's score, verl's `filter_groups.metric: acc`)."""
    groups = np.asarray(scores, np.float64).reshape(-1, group_size)
    return groups.max(axis=1) > groups.min(axis=1)


def choose_groups(varied: Sequence[np.ndarray], prompts: int) -> list[tuple[int, int]]:
    """(round, group) pairs of one batch of `prompts` groups: the varied groups in the order they
    were sampled, then, when the rounds ran out before the batch was full, the rest filled with
    all-equal groups (as a step without dynamic sampling would train on them)."""
    order = [(r, g) for r, flags in enumerate(varied) for g in np.flatnonzero(flags)]
    order += [(r, g) for r, flags in enumerate(varied) for g in np.flatnonzero(~flags)]
    if len(order) < prompts:
        raise ValueError(f"{len(order)} groups sampled, fewer than the batch's {prompts}")
    return [(r, int(g)) for r, g in order[:prompts]]


def left_pad(x: np.ndarray, width: int, value: int) -> np.ndarray:
    """Rows of left-padded prompts widened to `width` columns (more padding on the left)."""
    extra = width - x.shape[1]
    return np.pad(x, ((0, 0), (extra, 0)), constant_values=value) if extra > 0 else x


def gather_groups(rounds: Sequence[dict], chosen: Sequence[tuple[int, int]], group_size: int, pad_id: int) -> dict:
    """One batch from the chosen groups of several rounds. Each round is a dict of host arrays:
    per prompt `prompt_ids`, `prompt_mask` [B, W_r] (left-padded, widths may differ between
    rounds), per response row `response_ids`, `response_mask`, `logprobs` [B*G, T], `scores`
    [B*G]. Prompts are re-padded to the widest round."""
    width = max(r["prompt_ids"].shape[1] for r in rounds)
    out: dict[str, list] = {k: [] for k in rounds[0]}
    for r, g in chosen:
        part = rounds[r]
        for key, value in part.items():
            if key in ("prompt_ids", "prompt_mask"):
                row = left_pad(value[g : g + 1], width, pad_id if key == "prompt_ids" else 0)
                out[key].append(row)
            else:
                out[key].append(value[g * group_size : (g + 1) * group_size])
    return {k: np.concatenate(v, axis=0) for k, v in out.items()}
