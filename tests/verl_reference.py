"""float64 NumPy transcriptions of the verl code the PACS authors' GRPO and PPO baselines ran on.

The authors' code (ritzz-ai/PACS) imports `verl.utils.device`, added to verl on 2025-05-23, and
its scripts set `trainer.rollout_data_dir` (2025-04-24), so their verl is v0.4-era. These
follow verl v0.4.1: `verl/trainer/ppo/core_algos.py` (agg_loss, compute_policy_loss with the
dual clip, compute_value_loss, kl_penalty "low_var_kl", compute_gae_advantage_return,
compute_grpo_outcome_advantage), `verl_F.masked_whiten`, and how `dp_actor.py` /
`dp_critic.py` accumulate micro-batch losses (loss / gradient_accumulation, then FSDP averages
the gradients of the data-parallel ranks). Written from verl's semantics as explicit loops, to
be the independent reference for tests; none of pacs_jax is imported here.
"""

import numpy as np


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def agg_loss(loss_mat, mask, mode):
    """verl's agg_loss on one micro-batch [n, T]."""
    seq_sums = (loss_mat * mask).sum(-1)
    if mode == "token-mean":
        return masked_mean(loss_mat, mask)
    if mode == "seq-mean-token-sum":
        return seq_sums.mean()
    if mode == "seq-mean-token-mean":
        return (seq_sums / mask.sum(-1)).mean()
    assert mode == "seq-mean-token-sum-norm"
    return seq_sums.sum() / mask.shape[-1]  # a sum over the micro-batch's responses, / T


def accumulated(per_micro_batch_loss, rows, micro_batch_size, ranks=1):
    """The loss whose gradient verl's update applies for one mini-batch of `rows` responses:
    each of `ranks` data-parallel ranks holds rows / ranks responses, splits them into micro-
    batches of `micro_batch_size` (ppo_micro_batch_size_per_gpu), sums loss / accumulation
    steps over them; FSDP then averages the ranks. `per_micro_batch_loss(index_array)` is the
    loss of the micro-batch holding those rows."""
    per_rank = rows // ranks
    steps = per_rank // micro_batch_size  # dp_actor's gradient_accumulation
    total = 0.0
    for rank in range(ranks):
        for step in range(steps):
            start = rank * per_rank + step * micro_batch_size
            total += per_micro_batch_loss(np.arange(start, start + micro_batch_size)) / steps
    return total / ranks


def policy_loss(old_log_prob, log_prob, advantages, mask, clip_low, clip_high, clip_ratio_c, mode):
    """compute_policy_loss: the dual-clip PPO surrogate. Returns (loss, clipfrac, ppo_kl, clipfrac_lower)."""
    assert clip_ratio_c > 1.0
    negative_approx_kl = np.clip(log_prob - old_log_prob, -20.0, 20.0)
    ratio = np.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * np.clip(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = np.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean((pg_losses2 > pg_losses1).astype(float), mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = np.minimum(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean((clip_pg_losses1 > pg_losses3) * (advantages < 0).astype(float), mask)
    pg_losses = np.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return agg_loss(pg_losses, mask, mode), pg_clipfrac, ppo_kl, pg_clipfrac_lower


def value_loss(vpreds, returns, values, mask, cliprange_value, mode="token-mean"):
    """compute_value_loss: 0.5 * agg(max of the plain and the clipped squared error). Returns (loss, clipfrac)."""
    vpredclipped = np.clip(vpreds, values - cliprange_value, values + cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * agg_loss(np.maximum(vf_losses1, vf_losses2), mask, mode)
    return vf_loss, masked_mean((vf_losses2 > vf_losses1).astype(float), mask)


def low_var_kl(logprob, ref_logprob):
    """kl_penalty(..., "low_var_kl"), the k3 estimator with verl's two clamps."""
    kl = np.clip(ref_logprob - logprob, -20, 20)
    return np.clip(np.exp(kl) - kl - 1, -10, 10)


def masked_whiten(values, mask):
    mean = masked_mean(values, mask)
    centred = values - mean
    var = masked_mean(centred**2, mask) * mask.sum() / (mask.sum() - 1)  # unbiased, as torch
    return centred / np.sqrt(var + 1e-8)


def gae(token_level_rewards, values, mask, gamma, lam):
    """compute_gae_advantage_return as in v0.4.1: the next value is values[t + 1] (0 after the
    last position), advantages whitened over the mask. verl's critic returns values * mask, so
    past a response's end the values and rewards are 0. Returns (advantages, returns)."""
    rows, length = token_level_rewards.shape
    advantages = np.zeros((rows, length))
    for i in range(rows):
        lastgaelam = 0.0
        for t in reversed(range(length)):
            nextvalue = values[i, t + 1] if t < length - 1 else 0.0
            delta = token_level_rewards[i, t] + gamma * nextvalue - values[i, t]
            lastgaelam = delta + gamma * lam * lastgaelam
            advantages[i, t] = lastgaelam
    returns = advantages + values
    return masked_whiten(advantages, mask), returns


def gae_masked_carry(token_level_rewards, values, mask, gamma, lam):
    """The later verl version of compute_gae_advantage_return: masked positions carry the next
    value and advantage through unchanged (differs from v0.4.1 only where the mask has holes)."""
    nextvalues, lastgaelam, reversed_advantages = 0.0, 0.0, []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * mask[:, t] + (1 - mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * mask[:, t] + (1 - mask[:, t]) * lastgaelam
        reversed_advantages.append(lastgaelam)
    advantages = np.stack(reversed_advantages[::-1], axis=1)
    returns = advantages + values
    return masked_whiten(advantages, mask), returns


def grpo_advantage(token_level_rewards, mask, index, norm_adv_by_std, epsilon=1e-6):
    """compute_grpo_outcome_advantage: per prompt index, (score - mean) / (std + eps), std unbiased."""
    scores = token_level_rewards.sum(-1)
    out = np.zeros_like(scores)
    for idx in set(index):
        members = [i for i in range(len(scores)) if index[i] == idx]
        group = scores[members]
        mean, std = (group.mean(), group.std(ddof=1)) if len(group) > 1 else (0.0, 1.0)
        out[members] = (group - mean) / (std + epsilon) if norm_adv_by_std else group - mean
    return out[:, None] * mask


def outcome_token_rewards(scores, mask):
    """The reward manager's token_level_scores: each response's score on its last real token."""
    rewards = np.zeros(mask.shape)
    for i, row in enumerate(mask):
        real = np.flatnonzero(row)
        if len(real):
            rewards[i, real[-1]] = scores[i]
    return rewards
