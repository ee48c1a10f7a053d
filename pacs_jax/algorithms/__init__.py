"""Losses as pure functions of arrays: PACS and its baselines (GRPO / Dr. GRPO, GSPO, PPO, RLOO),
the rollout correction's weights, and DAPO's overlong shaping (host NumPy). No I/O."""

from pacs_jax.algorithms.common import aggregate_loss, masked_mean, masked_whiten
from pacs_jax.algorithms.grpo import grpo_advantages, grpo_loss
from pacs_jax.algorithms.gspo import gspo_loss, gspo_policy_loss
from pacs_jax.algorithms.overlong import overlong_penalty, truncated_responses
from pacs_jax.algorithms.pacs import pacs_loss
from pacs_jax.algorithms.ppo import gae, outcome_token_rewards, ppo_policy_loss, value_loss
from pacs_jax.algorithms.rloo import rloo_advantages, rloo_loss
from pacs_jax.algorithms.rollout_correction import rollout_correction_weights

__all__ = [
    "aggregate_loss",
    "gae",
    "grpo_advantages",
    "grpo_loss",
    "gspo_loss",
    "gspo_policy_loss",
    "masked_mean",
    "masked_whiten",
    "outcome_token_rewards",
    "overlong_penalty",
    "pacs_loss",
    "ppo_policy_loss",
    "rloo_advantages",
    "rloo_loss",
    "rollout_correction_weights",
    "truncated_responses",
    "value_loss",
]
