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


def policy_loss(old_log_prob, log_prob, advantages, mask, clip_low, clip_high, clip_ratio_c, mode, rollout_is_weights=None):
    """compute_policy_loss: the dual-clip PPO surrogate. Returns (loss, clipfrac, ppo_kl, clipfrac_lower).
    `rollout_is_weights` multiply the per-token loss before aggregation (verl since its rollout
    correction, compute_policy_loss_vanilla)."""
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
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
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


# ----------------------------------------------------------- GSPO, DAPO, rollout correction
# Later sources than the v0.4.1 code above: verl's compute_policy_loss_gspo and rollout_corr_helper
# (main, January 2026), the GSPO paper (Zheng et al. 2025, arXiv 2507.18071) and the DAPO paper
# (Yu et al. 2025, arXiv 2503.14476), each written out as loops.


def gspo_policy_loss(old_log_prob, log_prob, advantages, mask, clip_low, clip_high, rollout_is_weights=None):
    """verl's compute_policy_loss_gspo, forward: the sequence ratio exp(mean_t log ratio) on every
    token (clamped at log 10), the clipped surrogate, the IS weights, then agg_loss
    "seq-mean-token-mean" whatever loss_agg_mode says. Returns (loss, clipfrac, ppo_kl)."""
    rows, length = mask.shape
    pg_losses = np.zeros((rows, length))
    clipped = np.zeros((rows, length))
    for i in range(rows):
        real = max(mask[i].sum(), 1)
        seq_log_ratio = sum((log_prob[i, t] - old_log_prob[i, t]) * mask[i, t] for t in range(length)) / real
        ratio = np.exp(min(seq_log_ratio, 10.0))
        for t in range(length):
            loss1 = -advantages[i, t] * ratio
            loss2 = -advantages[i, t] * min(max(ratio, 1 - clip_low), 1 + clip_high)
            pg_losses[i, t] = max(loss1, loss2)
            clipped[i, t] = float(loss2 > loss1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    seq_losses = (pg_losses * mask).sum(-1) / (mask.sum(-1) + 1e-8)
    loss = seq_losses.mean()
    return loss, masked_mean(clipped, mask), masked_mean(old_log_prob - log_prob, mask)


def gspo_paper_objective_and_gradient(old_log_prob, log_prob, rewards, mask, group_size, clip_low, clip_high):
    """The GSPO paper (section 4, the objective and its gradient):
    J = 1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_l, 1 + eps_h) A_i) per group, with s_i = (pi(y_i) / pi_old(y_i))^(1 / |y_i|) and A_i the group-normalised reward
    (verl's unbiased std + 1e-6), averaged over the groups; its gradient in log pi(y_i,t) is
    1/G * s_i A_i / |y_i| where the unclipped term is the min, else 0. Returns (-J, d(-J)/d log pi)."""
    rows, length = mask.shape
    objective, grad = 0.0, np.zeros((rows, length))
    groups = rows // group_size
    for g in range(groups):
        members = range(g * group_size, (g + 1) * group_size)
        group_rewards = np.array([rewards[i] for i in members])
        advantages = (group_rewards - group_rewards.mean()) / (group_rewards.std(ddof=1) + 1e-6)
        for k, i in enumerate(members):
            n = mask[i].sum()
            s = np.exp(sum((log_prob[i, t] - old_log_prob[i, t]) for t in range(length) if mask[i, t]) / n)
            unclipped, bounded = s * advantages[k], min(max(s, 1 - clip_low), 1 + clip_high) * advantages[k]
            objective += min(unclipped, bounded) / group_size / groups
            if unclipped <= bounded:
                for t in range(length):
                    if mask[i, t]:
                        grad[i, t] = -s * advantages[k] / n / group_size / groups
    return -objective, grad


def dapo_overlong_reward(length, max_length, cache_length, penalty_factor=1.0):
    """The DAPO paper's soft overlong punishment (section 3.4), with verl's penalty_factor scaling it:
    0 up to L_max - L_cache, ((L_max - L_cache) - |y|) / L_cache in the cache, -1 beyond L_max."""
    if length <= max_length - cache_length:
        return 0.0
    if length <= max_length:
        return ((max_length - cache_length) - length) / cache_length * penalty_factor
    return -1.0 * penalty_factor


def dapo_objective(old_log_prob, log_prob, rewards, mask, group_size, eps_low, eps_high, truncated):
    """The DAPO paper's objective (its token-level loss, section 3.3), with overlong filtering
    (section 3.4: truncated samples are masked out of the loss): the clipped surrogate of every
    token of the kept responses, divided by their total length; advantages from all G rewards of
    a group (verl's unbiased std + 1e-6). No dual clip. Returns -J."""
    rows, length = mask.shape
    total, tokens = 0.0, 0.0
    for g in range(rows // group_size):
        members = list(range(g * group_size, (g + 1) * group_size))
        group_rewards = np.array([rewards[i] for i in members])
        advantages = (group_rewards - group_rewards.mean()) / (group_rewards.std(ddof=1) + 1e-6)
        for k, i in enumerate(members):
            if truncated[i]:
                continue
            for t in range(length):
                if mask[i, t]:
                    r = np.exp(log_prob[i, t] - old_log_prob[i, t])
                    total += min(r * advantages[k], min(max(r, 1 - eps_low), 1 + eps_high) * advantages[k])
                    tokens += 1
    return -total / tokens


def rollout_is_weights(old_log_prob, rollout_log_prob, mask, level, mode, threshold):
    """verl's rollout correction, decoupled mode. level "token": rho_t = exp(old - rollout);
    "sequence": exp(sum_t (old - rollout)) on every token; log-ratios clamped to +-20. mode
    "truncate" (TIS, compute_rollout_correction_weights): min(rho, C). mode "mask" (MIS,
    mismatch_helper's mask mode, lower threshold 1/C by default): rho inside [1/C, C], else 0.
    Zero off the mask. Returns (weights, fraction of real tokens outside the bound(s))."""
    rows, length = mask.shape
    weights, outside = np.zeros((rows, length)), np.zeros((rows, length))
    for i in range(rows):
        seq_log_ratio = sum((old_log_prob[i, t] - rollout_log_prob[i, t]) * mask[i, t] for t in range(length))
        for t in range(length):
            log_ratio = seq_log_ratio if level == "sequence" else old_log_prob[i, t] - rollout_log_prob[i, t]
            rho = np.exp(np.clip(log_ratio, -20.0, 20.0))
            if mode == "truncate":
                weights[i, t], outside[i, t] = min(rho, threshold), rho > threshold
            else:
                keep = 1.0 / threshold <= rho <= threshold
                weights[i, t], outside[i, t] = rho * keep, not keep
    return weights * mask, masked_mean(outside, mask)


def rollout_corr_k3_kl(old_log_prob, rollout_log_prob, mask):
    """compute_offpolicy_metrics' k3_kl: masked mean of exp(d) - d - 1, d = old - rollout."""
    d = old_log_prob - rollout_log_prob
    return masked_mean(np.exp(d) - d - 1, mask)
