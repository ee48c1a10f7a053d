"""The training forward pass and the jitted update step.

`response_logprobs` is THE log-prob function: old log-probs, the loss and evaluation all call it,
so the numbers the loss sees never come from the sampler's cached numerics.

`make_update_fn` builds one jitted, state-donating function that takes a whole rollout batch
(`prompts x G` rows, each group contiguous), splits it into mini-batches (one optimizer step each)
and micro-batches (gradient accumulation) with `lax.scan`, never splitting a group.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pacs_jax.algorithms import gae, grpo_loss, outcome_token_rewards, pacs_loss, ppo_policy_loss, rloo_loss, value_loss
from pacs_jax.algorithms.common import masked_mean
from pacs_jax.config import AlgorithmConfig, OptimizerConfig
from pacs_jax.models.llama import Decoder
from pacs_jax.sharding import constrain

ROLLOUT_KEYS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")


def response_logprobs(
    model: Decoder,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    response_ids: jax.Array,
    response_mask: jax.Array,
    temperature: float = 1.0,
    with_entropy: bool = False,
):
    """Per-token log pi(o_t | q, o_<t) of the response tokens, [N, T] float32 (0 on padding).

    Logits are divided by the sampling temperature, as the sampler did, so on-policy the two agree.
    With `with_entropy`, also the per-token entropy of that distribution.
    """
    hidden = response_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask)
    logits = model.logits(hidden)
    if temperature > 0:
        logits = logits / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    token_logprobs = jnp.take_along_axis(log_probs, response_ids[..., None], axis=-1)[..., 0]
    token_logprobs = token_logprobs * response_mask
    if not with_entropy:
        return token_logprobs
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1) * response_mask
    return token_logprobs, entropy


def response_hidden(model: Decoder, prompt_ids, prompt_mask, response_ids, response_mask) -> jax.Array:
    """Final hidden states at the positions that predict each response token, [N, T, D]."""
    prompt_len = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    hidden = model(ids, attention_mask=mask, return_hidden=True)
    # Position t predicts token t + 1: the response's predictions start at the last prompt position.
    return hidden[:, prompt_len - 1 : -1]


# ------------------------------------------------------------------------------- state


class TrainState(NamedTuple):
    """Everything the update changes. `params` is {"policy": ...} plus {"critic": ...} for PPO."""

    params: Any
    opt_state: Any


# The value head's initial weights are N(0, 0.02^2), its bias 0: verl's critic is
# AutoModelForTokenClassification with num_labels=1, whose `score` Linear is missing from the
# checkpoint and so gets transformers' _init_weights (normal, std = initializer_range, 0.02 for
# Llama and Qwen2.5; bias zeros), with dropout set to 0. A zero head would also stop the
# critic's decoder from learning on the first step (its gradient flows through the head).
VALUE_HEAD_INIT_STD = 0.02


class Critic(nnx.Module):
    """PPO's critic: a copy of the policy's decoder with a scalar value head on its final hidden state."""

    def __init__(self, decoder: Decoder, key: jax.Array):
        self.decoder = decoder
        head = VALUE_HEAD_INIT_STD * jax.random.normal(key, (decoder.config.hidden_size,), jnp.float32)
        self.value_head = nnx.Param(head, logical_axes=("embed",))
        self.value_bias = nnx.Param(jnp.zeros((), jnp.float32), logical_axes=())

    def __call__(self, prompt_ids, prompt_mask, response_ids, response_mask) -> jax.Array:
        hidden = response_hidden(self.decoder, prompt_ids, prompt_mask, response_ids, response_mask)
        values = jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), self.value_head[...]) + self.value_bias[...]
        return values * response_mask


def learning_rate_schedule(config: OptimizerConfig, total_updates: int) -> optax.Schedule:
    if config.schedule == "constant":
        if config.warmup_steps == 0:
            return optax.constant_schedule(config.lr)
        return optax.linear_schedule(0.0, config.lr, config.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, config.lr, config.warmup_steps, max(total_updates, config.warmup_steps + 1), end_value=0.0
    )


def make_optimizer(config: OptimizerConfig, total_updates: int, lr: Optional[float] = None) -> optax.GradientTransformation:
    """AdamW behind global-norm clipping (honoured, unlike the authors' code, which ignored it)."""
    if lr is not None:
        config = OptimizerConfig(**{**config.__dict__, "lr": lr})
    adamw = optax.adamw(
        learning_rate_schedule(config, total_updates),
        b1=config.b1,
        b2=config.b2,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw


def make_train_optimizer(algorithm: AlgorithmConfig, optimizer: OptimizerConfig, total_updates: int):
    """One optimizer per network: the policy's, and for PPO the critic's with its own lr."""
    transforms = {"policy": make_optimizer(optimizer, total_updates)}
    if algorithm.name == "ppo":
        transforms["critic"] = make_optimizer(optimizer, total_updates, lr=algorithm.critic_lr)
    return optax.multi_transform(transforms, lambda params: {name: name for name in params})


def init_train_state(
    policy: Decoder, optimizer: optax.GradientTransformation, with_critic: bool, seed: int = 0
) -> tuple[Any, TrainState]:
    """Returns (graphdefs, state). The critic starts as a copy of the policy's weights and a
    value head drawn from `seed`."""
    graphdefs = {}
    params = {}
    graphdefs["policy"], params["policy"] = nnx.split(policy)
    if with_critic:
        critic_decoder = nnx.merge(graphdefs["policy"], jax.tree.map(jnp.copy, params["policy"]))
        critic = Critic(critic_decoder, jax.random.key(seed))
        graphdefs["critic"], params["critic"] = nnx.split(critic)
    return graphdefs, TrainState(params=params, opt_state=optimizer.init(params))


# ------------------------------------------------------------------------------- losses


def _loss_fn(graphdefs, params, batch, algorithm: AlgorithmConfig, group_size: int, temperature: float, num_tokens=None):
    """The algorithm's loss on one micro-batch. `num_tokens` is the divisor of token-mean losses
    (see `aggregate_loss`); None = this batch's own count of real tokens."""
    policy = nnx.merge(graphdefs["policy"], params["policy"])
    logprobs, entropy = response_logprobs(
        policy, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], batch["response_mask"],
        temperature=temperature, with_entropy=True,
    )
    mask = batch["response_mask"]
    name = algorithm.name
    if name == "pacs":
        loss, metrics = pacs_loss(
            logprobs, batch["old_logprobs"], mask, batch["rewards"], group_size=group_size, beta=algorithm.beta,
            reward_method=algorithm.reward_method, adv_estimator=algorithm.adv_estimator,
            norm_adv_by_std=algorithm.norm_adv_by_std, weight_mode=algorithm.weight_mode,
        )
    elif name == "grpo":
        loss, metrics = grpo_loss(
            logprobs, batch["old_logprobs"], mask, batch["rewards"], group_size=group_size,
            clip_low=algorithm.clip_low, clip_high=algorithm.clip_high, norm_adv_by_std=algorithm.norm_adv_by_std,
            loss_agg_mode=algorithm.loss_agg_mode, ref_logprobs=batch.get("ref_logprobs"), kl_coef=algorithm.kl_coef,
            clip_ratio_c=algorithm.clip_ratio_c, num_tokens=num_tokens, seq_norm_divisor=algorithm.seq_norm_divisor,
        )
    elif name == "rloo":
        loss, metrics = rloo_loss(logprobs, mask, batch["rewards"], group_size=group_size, num_tokens=num_tokens)
    elif name == "ppo":
        aggregation = dict(num_tokens=num_tokens, seq_norm_divisor=algorithm.seq_norm_divisor)
        loss, metrics = ppo_policy_loss(
            logprobs, batch["old_logprobs"], batch["advantages"], mask,
            algorithm.clip_low, algorithm.clip_high, algorithm.loss_agg_mode, algorithm.clip_ratio_c, **aggregation,
        )
        critic = nnx.merge(graphdefs["critic"], params["critic"])
        values = critic(batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], mask)
        # The critic aggregates like the actor: verl's critic.loss_agg_mode defaults to the actor's
        # (since verl 2025-05-23, which the authors' code needs), and their PPO run sets only the actor's.
        critic_loss, critic_metrics = value_loss(
            values, batch["old_values"], batch["returns"], mask, algorithm.value_clip, algorithm.loss_agg_mode,
            **aggregation,
        )
        loss = loss + algorithm.value_coef * critic_loss
        metrics = {**metrics, **critic_metrics}
    else:
        raise ValueError(f"algorithm.name {name!r} is not one of ['pacs', 'grpo', 'ppo', 'rloo']")
    metrics = {**metrics, "loss": loss, "entropy": masked_mean(entropy, mask)}
    return loss, metrics


def make_update_fn(
    graphdefs,
    optimizer: optax.GradientTransformation,
    algorithm: AlgorithmConfig,
    *,
    group_size: int,
    mini_batches: int,
    micro_batches: int,
    temperature: float = 1.0,
    state_sharding=None,
) -> Callable:
    """update(state, batch) -> (state, metrics). `batch` holds [N, ...] arrays: the rollout
    (ROLLOUT_KEYS), "rewards" [N], "old_logprobs" [N, T], and per algorithm "ref_logprobs",
    "old_values". N must be prompts x group_size with prompts divisible into mini and micro batches."""

    def split(x, prompts):
        rows_per_micro = prompts // (mini_batches * micro_batches) * group_size
        return x.reshape(mini_batches, micro_batches, rows_per_micro, *x.shape[1:])

    def update(state: TrainState, batch: dict):
        rows = batch["rewards"].shape[0]
        prompts = rows // group_size
        if rows % group_size or prompts % (mini_batches * micro_batches):
            raise ValueError(
                f"the rollout batch of {rows} responses must be whole groups of {group_size} whose "
                f"{prompts} prompts divide into {mini_batches} mini-batches x {micro_batches} micro-batches"
            )
        batch = dict(batch)
        if algorithm.name == "ppo":
            # Advantages once per rollout batch, from the values the critic had when it was sampled.
            token_rewards = outcome_token_rewards(batch["rewards"], batch["response_mask"])
            batch["advantages"], batch["returns"] = gae(
                token_rewards, batch["old_values"], batch["response_mask"], algorithm.gamma, algorithm.lam
            )
        # Keep each micro-batch's rows spread over the data axes (not the mini-batch axis, which
        # the scan walks): without this the partitioner may split the scanned axis instead.
        batches = jax.tree.map(lambda x: constrain(split(x, prompts), (None, None, "batch")), batch)
        grad_fn = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)

        def optimizer_step(state: TrainState, mini_batch):
            # Token means divide by the mini-batch's real tokens (per micro-batch on average), not each
            # micro-batch's own: then the mean of the micro-batch gradients is the mini-batch's gradient
            # however unevenly long and short responses fall into micro-batches.
            num_tokens = jnp.maximum(jnp.sum(mini_batch["response_mask"]), 1) / micro_batches

            def accumulate(grads, micro_batch):
                (_, metrics), micro_grads = grad_fn(
                    graphdefs, state.params, micro_batch, algorithm, group_size, temperature, num_tokens
                )
                return jax.tree.map(jnp.add, grads, micro_grads), metrics

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, metrics = jax.lax.scan(accumulate, zeros, mini_batch)
            grads = jax.tree.map(lambda g: g / micro_batches, grads)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(grad_norm)
            # A non-finite gradient would poison Adam's moments: skip the whole step, keep counting.
            safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
            updates, new_opt_state = optimizer.update(safe_grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            state = TrainState(keep(new_params, state.params), keep(new_opt_state, state.opt_state))
            metrics = jax.tree.map(jnp.mean, metrics)
            metrics["grad_norm"] = grad_norm
            metrics["skipped_steps"] = (~finite).astype(jnp.float32)
            return state, metrics

        state, metrics = jax.lax.scan(optimizer_step, state, batches)
        skipped = metrics.pop("skipped_steps").sum()
        grad_norms = metrics.pop("grad_norm")
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["skipped_steps"] = skipped
        # The mean over the steps that were taken (a skipped step's norm is inf/nan by definition).
        taken = jnp.isfinite(grad_norms)
        metrics["grad_norm"] = jnp.sum(jnp.where(taken, grad_norms, 0.0)) / jnp.maximum(taken.sum(), 1)
        return state, metrics

    return jax.jit(update, donate_argnums=0, out_shardings=(state_sharding, None) if state_sharding is not None else None)


def make_prepare_fn(graphdefs, algorithm: AlgorithmConfig, *, temperature: float = 1.0, chunks: int = 1) -> Callable:
    """prepare(params, ref_params, rollout_arrays) -> dict with "old_logprobs" (and "old_values"
    for PPO, "ref_logprobs" when a KL term asks for it), from the exact training forward pass.
    Dispatched before the host checks rewards, so the two overlap. `chunks` bounds memory."""

    def prepare(params, ref_params, rollout: dict):
        def one_chunk(chunk):
            policy = nnx.merge(graphdefs["policy"], params["policy"])
            args = [chunk[k] for k in ROLLOUT_KEYS]
            out = {"old_logprobs": response_logprobs(policy, *args, temperature=temperature)}
            if algorithm.name == "ppo":
                out["old_values"] = nnx.merge(graphdefs["critic"], params["critic"])(*args)
            if ref_params is not None:
                reference = nnx.merge(graphdefs["policy"], ref_params)
                out["ref_logprobs"] = response_logprobs(reference, *args, temperature=temperature)
            return out

        rows = rollout["response_ids"].shape[0]
        chunked = {k: constrain(rollout[k].reshape(chunks, rows // chunks, *rollout[k].shape[1:]), (None, "batch")) for k in ROLLOUT_KEYS}
        out = jax.lax.map(one_chunk, chunked)
        return jax.tree.map(lambda x: x.reshape(rows, *x.shape[2:]), out)

    return jax.jit(prepare)


def make_sft_step(graphdef, optimizer: optax.GradientTransformation) -> Callable:
    """Supervised warm-up: maximise log pi(reference response | prompt) on masked tokens."""

    def loss_fn(params, batch):
        policy = nnx.merge(graphdef, params)
        logprobs = response_logprobs(policy, *(batch[k] for k in ROLLOUT_KEYS))
        mask = batch["response_mask"]
        return -jnp.sum(logprobs) / jnp.maximum(jnp.sum(mask), 1)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"sft/loss": loss, "sft/grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))
