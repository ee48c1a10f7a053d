"""DAPO's dynamic sampling, host side, against a direct reading of its rule: keep the groups whose
rewards are not all equal, in the order sampled, fill with the others only when the rounds ran out."""

import numpy as np
import pytest

from pacs_jax.dynamic_sampling import choose_groups, gather_groups, varied_groups


def test_varied_groups_is_not_all_equal():
    scores = np.array([1, 1, 0, 1, 0, 0, 0.5, 0.5, 1, 0], np.float32)
    assert varied_groups(scores, 2).tolist() == [False, True, False, False, True]


def test_choose_groups_prefers_varied_in_sampling_order_then_fills():
    varied = [np.array([False, True, True]), np.array([True, False, False])]
    assert choose_groups(varied, 3) == [(0, 1), (0, 2), (1, 0)]
    assert choose_groups(varied, 4) == [(0, 1), (0, 2), (1, 0), (0, 0)]  # rounds ran out: filled
    with pytest.raises(ValueError):
        choose_groups(varied, 7)


def test_gather_groups_repads_prompts_and_keeps_rows_together():
    rng = np.random.default_rng(0)
    group, pad = 2, 9

    def part(width, prompts):
        ids = rng.integers(0, 8, (prompts, width))
        mask = np.ones_like(ids)
        ids[:, 0], mask[:, 0] = pad, 0  # one left pad
        return {"prompt_ids": ids, "prompt_mask": mask, "response_ids": rng.integers(0, 8, (prompts * group, 3)),
                "response_mask": np.ones((prompts * group, 3), np.int32), "logprobs": rng.normal(size=(prompts * group, 3)),
                "scores": rng.integers(0, 2, prompts * group).astype(np.float32)}

    rounds = [part(4, 3), part(6, 3)]
    out = gather_groups(rounds, [(1, 2), (0, 0)], group, pad)
    assert out["prompt_ids"].shape == (2, 6) and out["response_ids"].shape == (4, 3)
    np.testing.assert_array_equal(out["prompt_ids"][0], rounds[1]["prompt_ids"][2])
    np.testing.assert_array_equal(out["prompt_ids"][1], [pad, pad, *rounds[0]["prompt_ids"][0]])
    np.testing.assert_array_equal(out["prompt_mask"][1], [0, 0, *rounds[0]["prompt_mask"][0]])
    np.testing.assert_array_equal(out["response_ids"][:2], rounds[1]["response_ids"][4:6])
    np.testing.assert_array_equal(out["logprobs"][2:], rounds[0]["logprobs"][:2])
    np.testing.assert_array_equal(out["scores"], np.concatenate([rounds[1]["scores"][4:6], rounds[0]["scores"][:2]]))
