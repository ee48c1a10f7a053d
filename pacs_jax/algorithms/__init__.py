"""Losses as pure functions of arrays: PACS and its baselines (GRPO, PPO, RLOO). No I/O."""

from pacs_jax.algorithms.common import aggregate_loss, masked_mean, masked_whiten
from pacs_jax.algorithms.grpo import grpo_advantages, grpo_loss
from pacs_jax.algorithms.pacs import pacs_loss
from pacs_jax.algorithms.ppo import gae, outcome_token_rewards, ppo_policy_loss, value_loss
from pacs_jax.algorithms.rloo import rloo_advantages, rloo_loss

__all__ = [
    "aggregate_loss",
    "gae",
    "grpo_advantages",
    "grpo_loss",
    "masked_mean",
    "masked_whiten",
    "outcome_token_rewards",
    "pacs_loss",
    "ppo_policy_loss",
    "rloo_advantages",
    "rloo_loss",
    "value_loss",
]
