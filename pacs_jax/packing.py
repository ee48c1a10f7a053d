"""Sequence packing for the update and old-log-prob passes (host side, NumPy only).

Unpacked, every row of those passes is `prompt bucket + max_new_tokens` long whatever the real
lengths; with maths responses of a few hundred to a few thousand tokens most of it is padding.
`pack_rollout` lays the real (prompt + response) sequences back to back into rows of
`row_tokens` positions, first-fit-decreasing, each micro-batch into its own rows:

    packed_ids   [M * R, L]  the tokens (pad 0 after the last segment of a row)
    segment_ids  [M * R, L]  1, 2, ... per sequence in its row; 0 on padding
    positions    [M * R, L]  RoPE positions, restarting at 0 in each segment
    take         [N, T]      for response token t of rollout row i: the index, within its
                             micro-batch's flattened [R * L] rows, of the position that predicts it

M = mini-batches x micro-batches; micro-batch m holds the same rollout rows as unpacked (rows
m * N / M ... ), so groups stay whole and every [N, T] array (masks, rewards, old log-probs)
keeps its layout: the losses do not change, and token-mean divisors are the same numbers.
R, the rows per micro-batch, is the smallest entry of a short ladder (eighths of one
sequence per row, rounded up to `row_multiple`) that holds every micro-batch: at most 8
static shapes, and the top entry always fits. See ../shared/notes/packing.md.
"""

from __future__ import annotations

import numpy as np

PACKED_KEYS = ("packed_ids", "segment_ids", "positions", "take")
# Rows per micro-batch are rounded up to one of these fractions of "one sequence per row".
LADDER_STEPS = 8


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def row_ladder(sequences_per_micro: int, row_multiple: int = 1) -> list[int]:
    """The allowed rows per micro-batch, ascending; the last one holds a sequence per row."""
    top = _round_up(sequences_per_micro, row_multiple)
    steps = {_round_up(-(-sequences_per_micro * k // LADDER_STEPS), row_multiple) for k in range(1, LADDER_STEPS + 1)}
    return sorted(min(step, top) for step in steps)


def first_fit_decreasing(lengths: np.ndarray, row_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(row, offset) of each sequence and the number of rows: longest first, each into the first
    row with room (ties broken by index, so every process computes the same plan)."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    used: list[int] = []
    row = np.zeros(len(lengths), np.int64)
    offset = np.zeros(len(lengths), np.int64)
    for i in order:
        n = int(lengths[i])
        for r, filled in enumerate(used):
            if filled + n <= row_tokens:
                break
        else:
            r = len(used)
            used.append(0)
        row[i], offset[i] = r, used[r]
        used[r] += n
    return row, offset, len(used)


def real_lengths(prompt_mask: np.ndarray, response_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real prompt and response lengths; checks the layouts packing relies on (prompts left-padded,
    responses a prefix of real tokens, at least one prompt token)."""
    prompt_mask = np.asarray(prompt_mask).astype(bool)
    response_mask = np.asarray(response_mask).astype(bool)
    prompt_len = prompt_mask.sum(axis=1)
    response_len = response_mask.sum(axis=1)
    width = prompt_mask.shape[1]
    if (prompt_len < 1).any():
        raise ValueError("packing needs at least one real prompt token per row")
    if not np.array_equal(prompt_mask, np.arange(width)[None, :] >= width - prompt_len[:, None]):
        raise ValueError("packing needs left-padded prompts (prompt_mask 0...0 1...1 per row)")
    if not np.array_equal(response_mask, np.arange(response_mask.shape[1])[None, :] < response_len[:, None]):
        raise ValueError("packing needs each response_mask to be 1...1 0...0 (real tokens first)")
    return prompt_len, response_len


def pack_rollout(
    prompt_ids: np.ndarray,
    prompt_mask: np.ndarray,
    response_ids: np.ndarray,
    response_mask: np.ndarray,
    *,
    micro_batches: int,
    row_tokens: int,
    row_multiple: int = 1,
    pad_id: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The packed layout of a rollout batch ([N, P] left-padded prompts, [N, T] responses) for
    `micro_batches` = mini-batches x micro-batches in all, and packing statistics."""
    prompt_ids, response_ids = np.asarray(prompt_ids), np.asarray(response_ids)
    rows, response_width = response_ids.shape
    prompt_width = prompt_ids.shape[1]
    if rows % micro_batches:
        raise ValueError(f"{rows} rollout rows do not split into {micro_batches} micro-batches")
    prompt_len, response_len = real_lengths(prompt_mask, response_mask)
    lengths = prompt_len + response_len
    if lengths.max() > row_tokens:
        raise ValueError(f"a sequence of {lengths.max()} tokens does not fit a packed row of {row_tokens}")
    per_micro = rows // micro_batches
    plans = [first_fit_decreasing(lengths[m * per_micro : (m + 1) * per_micro], row_tokens) for m in range(micro_batches)]
    needed = max(used for _, _, used in plans)
    rows_per_micro = next(r for r in row_ladder(per_micro, row_multiple) if r >= needed)

    shape = (micro_batches * rows_per_micro, row_tokens)
    packed_ids = np.full(shape, pad_id, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    take = np.zeros((rows, response_width), np.int32)
    segments_in_row = np.zeros(shape[0], np.int32)
    steps = np.arange(response_width)
    for m, (row, offset, _) in enumerate(plans):
        for k in range(per_micro):
            i = m * per_micro + k
            p, n = int(prompt_len[i]), int(response_len[i])
            r = m * rows_per_micro + int(row[k])
            start = int(offset[k])
            segments_in_row[r] += 1
            packed_ids[r, start : start + p] = prompt_ids[i, prompt_width - p :]
            packed_ids[r, start + p : start + p + n] = response_ids[i, :n]
            segment_ids[r, start : start + p + n] = segments_in_row[r]
            positions[r, start : start + p + n] = np.arange(p + n)
            # Position start + p - 1 + t predicts response token t; past the response any
            # in-range index will do (the response mask zeroes it).
            local = (int(row[k]) * row_tokens + start + p - 1 + steps)
            take[i] = np.where(steps < n, local, 0)
    stats = {
        "pack/rows_per_micro_batch": float(rows_per_micro),
        "pack/rows_needed": float(needed),
        "pack/fill": float(lengths.sum() / (shape[0] * row_tokens)),
        "pack/unpacked_fill": float(lengths.sum() / (rows * (prompt_width + response_width))),
    }
    return {"packed_ids": packed_ids, "segment_ids": segment_ids, "positions": positions, "take": take}, stats
