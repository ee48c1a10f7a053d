"""The training forward pass and the jitted update step.

`response_logprobs` is THE log-prob function: old log-probs, the loss and evaluation all call it,
so the numbers the loss sees never come from the sampler's cached numerics.

`make_update_fn` builds one jitted, state-donating function that takes a whole rollout batch
(`prompts x G` rows, each group contiguous), splits it into mini-batches (one optimizer step each)
and micro-batches (gradient accumulation) with `lax.scan`, never splitting a group. The first
mini-batch is on-policy by construction (its old log-probs are its own forward's), so
`make_prepare_fn` computes old log-probs for mini-batches 2..k only.

Both passes take the rollout padded ([N, prompt bucket + T] rows) or packed (PACKED_KEYS from
pacs_jax.packing: several sequences per row); either way the log-probs come back as [N, T].
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pacs_jax import xla_options
from pacs_jax.algorithms import (
    gae, grpo_loss, gspo_loss, outcome_token_rewards, pacs_loss, ppo_policy_loss, rloo_loss, rollout_correction_weights,
    value_loss,
)
from pacs_jax.algorithms.common import masked_mean
from pacs_jax.config import AlgorithmConfig, OptimizerConfig
from pacs_jax.models.llama import Decoder, indexed_layers, layer_index
from pacs_jax.models.shared_prompt import grouped_response_hidden, shares_prompts
from pacs_jax.packing import PACKED_KEYS
from pacs_jax.sharding import constrain, traced_batch_ways, train_state_shardings

ROLLOUT_KEYS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
# What the forward passes read: the rollout, and the packed layout when the batch is packed.
FORWARD_KEYS = ROLLOUT_KEYS + PACKED_KEYS


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
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response_ids, "response_mask": response_mask}
    return batch_logprobs(model, batch, temperature, with_entropy)


def batch_logprobs(model: Decoder, batch: dict, temperature: float = 1.0, with_entropy: bool = False, group_size: int = 0):
    """`response_logprobs` of a batch dict: the rollout (ROLLOUT_KEYS), packed or not (PACKED_KEYS).
    `group_size` > 1: the rows are groups of that many responses to one prompt, whose prompt is
    then run once per group (pacs_jax.models.shared_prompt; unpacked batches only)."""

    def head(hidden, labels):
        logits = model.logits(hidden)
        if temperature > 0:
            logits = logits / temperature
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        token_logprobs = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
        if not with_entropy:
            return (token_logprobs,)
        return token_logprobs, -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)

    out = per_response_token(model, batch, head, group_size)
    return out if with_entropy else out[0]


def per_response_token(model: Decoder, batch: dict, head: Callable, group_size: int = 0) -> tuple:
    """`head(hidden [B, S, D], labels [B, S])` -> tuple of [B, S] float32, evaluated at the positions
    that predict each response token (labels: that token), each returned as [N, T] (0 on padding).

    Unpacked: the hidden states of prompt + response rows, sliced to the response (with
    `group_size` > 1, each group's prompt run once where the groups split over the batch's devices:
    `grouped_response_hidden`, `shares_prompts`). Packed
    (pacs_jax.packing): the head runs over the packed rows, and only its per-position scalars are
    gathered back to [N, T] with the host's `take` indices (never hidden states or logits: rows and
    responses may sit on different chips)."""
    mask = batch["response_mask"]
    if "segment_ids" not in batch:
        rollout = (batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"], mask)
        if shares_prompts(mask.shape[0], group_size, traced_batch_ways()):
            hidden = grouped_response_hidden(model, *rollout, group_size)
        else:
            hidden = response_hidden(model, *rollout)
        return tuple(x * mask for x in head(hidden, batch["response_ids"]))
    ids = batch["packed_ids"]
    hidden = model(ids, positions=batch["positions"], segment_ids=batch["segment_ids"], return_hidden=True)
    # Position c predicts token c + 1 of its row; a segment's last position is never taken, so the
    # label that rolls over from the next segment (or the row's start) is never used.
    outs = head(hidden, jnp.roll(ids, -1, axis=1))
    return tuple(x.reshape(-1)[batch["take"]] * mask for x in outs)


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

    def __call__(self, batch: dict, group_size: int = 0) -> jax.Array:
        """Values at the positions that predict each response token, [N, T] (0 on padding);
        `batch` and `group_size` as for `batch_logprobs`."""

        def head(hidden, labels):
            return (jnp.einsum("btd,d->bt", hidden.astype(jnp.float32), self.value_head[...]) + self.value_bias[...],)

        return per_response_token(self.decoder, batch, head, group_size)[0]


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
    policy: Decoder, optimizer: optax.GradientTransformation, with_critic: bool, seed: int = 0, mesh=None
) -> tuple[Any, TrainState]:
    """Returns (graphdefs, state). The critic starts as a copy of the policy's weights and a
    value head drawn from `seed`. With `mesh` (a policy already sharded on it), the critic and the
    optimizer state are created under jit straight into their shards (`train_state_shardings`),
    never whole on one device; the policy's arrays are used as they are."""
    graphdefs = {}
    graphdefs["policy"], policy_params = nnx.split(policy)
    init = make_state_init(graphdefs, optimizer, with_critic, seed)
    if mesh is None:
        critic, opt_state = init(policy_params)
    else:
        with jax.set_mesh(mesh):
            critic, opt_state = jit_state_init(init, policy_params, mesh)(policy_params)
    params = {"policy": policy_params, **({"critic": critic} if with_critic else {})}
    return graphdefs, TrainState(params=params, opt_state=opt_state)


def make_state_init(graphdefs: dict, optimizer: optax.GradientTransformation, with_critic: bool, seed: int = 0) -> Callable:
    """init(policy params) -> (the critic's params or None, the optimizer state): what a train state
    holds besides the policy. Tracing it sets graphdefs["critic"]."""

    def init(policy_params):
        params = {"policy": policy_params}
        if with_critic:
            critic_decoder = nnx.merge(graphdefs["policy"], jax.tree.map(jnp.copy, policy_params))
            graphdefs["critic"], params["critic"] = nnx.split(Critic(critic_decoder, jax.random.key(seed)))
        return params.get("critic"), optimizer.init(params)

    return init


def jit_state_init(init: Callable, policy_params, mesh) -> Callable:
    """`init` jitted with its outputs in their shards on `mesh` (the program `compile` reports as init)."""
    return jax.jit(init, out_shardings=train_state_shardings(jax.eval_shape(init, policy_params), mesh))


# ------------------------------------------------------------------------------- losses


def _loss_fn(graphdefs, params, batch, algorithm: AlgorithmConfig, group_size: int, temperature: float, num_tokens=None,
             on_policy=False, shared_prompts=False):
    """The algorithm's loss on one micro-batch. `num_tokens` is the divisor of token-mean losses
    (see `aggregate_loss`); None = this batch's own count of real tokens. Where `on_policy` (a
    traced bool) holds, the old log-probs are this forward pass's own (stop-gradient): the ratio is
    exactly 1 in any dtype, and batch["old_logprobs"] is not read. `shared_prompts`: run each
    group's prompt once (`batch_logprobs`)."""
    policy = nnx.merge(graphdefs["policy"], params["policy"])
    prompt_group = group_size if shared_prompts else 0
    logprobs, entropy = batch_logprobs(policy, batch, temperature, with_entropy=True, group_size=prompt_group)
    mask = batch["response_mask"]
    old_logprobs = jnp.where(on_policy, jax.lax.stop_gradient(logprobs), batch["old_logprobs"])
    keep = _kept_responses(batch, algorithm)
    loss_mask = _loss_mask(batch, algorithm)
    token_weights, correction_metrics = None, {}
    if "sampler_logprobs" in batch:
        token_weights, correction_metrics = rollout_correction_weights(
            old_logprobs, batch["sampler_logprobs"], mask, mode=algorithm.rollout_correction,
            cap=algorithm.rollout_correction_cap, level=algorithm.rollout_correction_level,
        )
    elif algorithm.rollout_correction != "none":
        raise ValueError(f"algorithm.rollout_correction={algorithm.rollout_correction!r} needs the sampler's "
                         f"per-token log-probs in batch['sampler_logprobs']")
    if algorithm.rollout_correction == "none":
        token_weights = None
    name = algorithm.name
    if name == "pacs":
        # Paper v2's score (algorithm.score_reference=reference) compares against the reference
        # policy, whose log-probs come from make_prepare_fn's reference pass; v1's against pi_old.
        baseline = batch["ref_logprobs"] if algorithm.score_reference == "reference" else old_logprobs
        loss, metrics = pacs_loss(
            logprobs, baseline, mask, batch["rewards"], group_size=group_size, beta=algorithm.beta,
            reward_method=algorithm.reward_method, adv_estimator=algorithm.adv_estimator,
            norm_adv_by_std=algorithm.norm_adv_by_std, weight_mode=algorithm.weight_mode,
            token_weights=token_weights, response_keep=keep,
        )
    elif name == "grpo":
        loss, metrics = grpo_loss(
            logprobs, old_logprobs, loss_mask, batch["rewards"], group_size=group_size,
            clip_low=algorithm.clip_low, clip_high=algorithm.clip_high, norm_adv_by_std=algorithm.norm_adv_by_std,
            loss_agg_mode=algorithm.loss_agg_mode, ref_logprobs=batch.get("ref_logprobs"), kl_coef=algorithm.kl_coef,
            clip_ratio_c=algorithm.clip_ratio_c, num_tokens=num_tokens, seq_norm_divisor=algorithm.seq_norm_divisor,
            token_weights=token_weights,
        )
    elif name == "gspo":
        loss, metrics = gspo_loss(
            logprobs, old_logprobs, loss_mask, batch["rewards"], group_size=group_size, clip_low=algorithm.clip_low,
            clip_high=algorithm.clip_high, norm_adv_by_std=algorithm.norm_adv_by_std, token_weights=token_weights,
        )
    elif name == "rloo":
        loss, metrics = rloo_loss(logprobs, loss_mask, batch["rewards"], group_size=group_size, num_tokens=num_tokens,
                                  token_weights=token_weights)
    elif name == "ppo":
        aggregation = dict(num_tokens=num_tokens, seq_norm_divisor=algorithm.seq_norm_divisor)
        loss, metrics = ppo_policy_loss(
            logprobs, old_logprobs, batch["advantages"], loss_mask,
            algorithm.clip_low, algorithm.clip_high, algorithm.loss_agg_mode, algorithm.clip_ratio_c,
            token_weights=token_weights, **aggregation,
        )
        critic = nnx.merge(graphdefs["critic"], params["critic"])
        values = critic(batch, prompt_group)
        # The critic aggregates like the actor: verl's critic.loss_agg_mode defaults to the actor's
        # (since verl 2025-05-23, which the authors' code needs), and their PPO run sets only the actor's.
        critic_loss, critic_metrics = value_loss(
            values, batch["old_values"], batch["returns"], loss_mask, algorithm.value_clip, algorithm.loss_agg_mode,
            **aggregation,
        )
        loss = loss + algorithm.value_coef * critic_loss
        metrics = {**metrics, **critic_metrics}
    else:
        raise ValueError(f"algorithm.name {name!r} is not one of ['pacs', 'grpo', 'gspo', 'ppo', 'rloo']")
    metrics = {**metrics, "loss": loss, "entropy": masked_mean(entropy, mask)}
    # Token means over the whole batch: this micro-batch's sums here, divided in `update`.
    real_tokens = jnp.sum(mask)
    metrics.update({k: v * real_tokens if k in _TOKEN_MEANS else v for k, v in correction_metrics.items()})
    if keep is not None:
        metrics["actor/overlong_filtered_fraction"] = 1.0 - jnp.mean(keep)
    if "sampler_logprobs" in batch:
        # The training forward's log-probs at the rollout's weights (this pass's own on-policy,
        # the old-log-prob pass's otherwise) against the sampler's: sums here, means in `update`.
        gap = jnp.abs(old_logprobs - batch["sampler_logprobs"]) * mask
        metrics[_DIFF_SUM], metrics[_DIFF_MAX] = jnp.sum(gap), jnp.max(gap)
    return loss, metrics


def _kept_responses(batch: dict, algorithm: AlgorithmConfig):
    """[N] 1 for the responses in the loss, 0 for the truncated ones with `overlong_filter`; None = all."""
    if not algorithm.overlong_filter:
        return None
    if "truncated" not in batch:
        raise ValueError("algorithm.overlong_filter needs batch['truncated'] ([N], 1 = reached max_new_tokens without "
                         "a stop token: pacs_jax.algorithms.truncated_responses)")
    return 1.0 - batch["truncated"].astype(jnp.float32)


def _loss_mask(batch: dict, algorithm: AlgorithmConfig) -> jax.Array:
    """The response mask without the responses `_kept_responses` leaves out (what token means count)."""
    keep = _kept_responses(batch, algorithm)
    mask = batch["response_mask"]
    return mask if keep is None else mask * keep[..., None].astype(mask.dtype)


_DIFF_SUM, _DIFF_MAX = "rollout/logprob_diff_sum", "rollout/logprob_diff_max"
# Per-token means that `update` reports over the whole batch (summed over micro-batches first).
_TOKEN_MEANS = ("rollout_corr/k3_kl", "rollout_corr/weight_mean", "rollout_corr/capped_fraction",
                "rollout_corr/masked_fraction")
_MAXES = (_DIFF_MAX, "rollout_corr/ratio_max", "rollout_corr/weight_max")


def _reduce_metrics(metrics: dict) -> dict:
    """Means over the leading (scanned) axis, except the per-token sums (summed) and maxima."""
    sums = {k: jnp.sum(metrics.pop(k)) for k in (_DIFF_SUM, *_TOKEN_MEANS) if k in metrics}
    maxes = {k: jnp.max(metrics.pop(k)) for k in _MAXES if k in metrics}
    return {**jax.tree.map(jnp.mean, metrics), **sums, **maxes}


class LayerIndexed:
    """`fun` jitted (`xla_options.jit(kind=..., **jit_kwargs)`) and called with one more
    argument: `llama.layer_index(layers)` when the policy's training passes unroll their layers
    (CPU, `model.train_layers`), which `fun` then traces inside `indexed_layers`, so the layer
    weights' slices compile as one kernel per shape, not one per layer; else None. `policy_of`
    picks the policy's split state out of the arguments (read for its config at the first call)."""

    _UNREAD = object()

    def __init__(self, fun: Callable, graphdef, policy_of: Callable, *, kind: str, **jit_kwargs):
        def indexed(*args):
            *args, index = args
            with indexed_layers(index):
                return fun(*args)

        # The program keeps fun's name in compile logs and profiles (not functools.wraps: jit
        # would read fun's signature, which lacks the index argument).
        indexed.__name__ = indexed.__qualname__ = fun.__name__

        self._jitted = xla_options.jit(indexed, kind=kind, **jit_kwargs)
        self._graphdef, self._policy_of, self._index = graphdef, policy_of, self._UNREAD

    def _args(self, args):
        if self._index is self._UNREAD:
            config = nnx.merge(self._graphdef, self._policy_of(*args)).config
            self._index = layer_index(config.num_layers) if config.unrolled_training_layers() else None
        return (*args, self._index)

    def __call__(self, *args):
        return self._jitted(*self._args(args))

    def lower(self, *args):
        return self._jitted.lower(*self._args(args))


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
    first_mini_batch_on_policy: bool = True,
    shared_prompts: bool = False,
) -> Callable:
    """update(state, batch) -> (state, metrics). `batch` holds [N, ...] arrays: the rollout
    (ROLLOUT_KEYS), "rewards" [N], "old_logprobs" [N, T], and per algorithm "ref_logprobs",
    "old_values"; optionally the packed layout (PACKED_KEYS, pacs_jax.packing, from the same
    micro-batch count) and the sampler's "sampler_logprobs" [N, T] (then the metrics
    rollout/logprob_diff_mean and _max compare them with the training forward's, per token).
    N must be prompts x group_size with prompts divisible into mini and micro batches.

    The first mini-batch is on-policy by construction (`first_mini_batch_on_policy`): its old
    log-probs are its own forward pass's, so the old-log-prob pass only serves mini-batches 2..k
    (`make_prepare_fn(on_policy_chunks=micro_batches)`); False reads batch["old_logprobs"] there too.

    `shared_prompts`: the rows of each group share one prompt (as `generate` returns them), which
    the forward pass then runs once per group (pacs_jax.models.shared_prompt; unpacked batches)."""

    def split(x):
        # Micro-batch m holds rows m * rows / (mini * micro) ...: groups (and packed rows) stay whole.
        return x.reshape(mini_batches, micro_batches, x.shape[0] // (mini_batches * micro_batches), *x.shape[1:])

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
        batches = jax.tree.map(lambda x: constrain(split(x), (None, None, "batch")), batch)
        on_policy = (jnp.arange(mini_batches) == 0) & first_mini_batch_on_policy
        grad_fn = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)

        def optimizer_step(state: TrainState, inputs):
            mini_batch, first = inputs
            # Token means divide by the mini-batch's real tokens (per micro-batch on average), not each
            # micro-batch's own: then the mean of the micro-batch gradients is the mini-batch's gradient
            # however unevenly long and short responses fall into micro-batches.
            num_tokens = jnp.maximum(jnp.sum(_loss_mask(mini_batch, algorithm)), 1) / micro_batches

            def accumulate(grads, micro_batch):
                (_, metrics), micro_grads = grad_fn(
                    graphdefs, state.params, micro_batch, algorithm, group_size, temperature, num_tokens, first, shared_prompts
                )
                return jax.tree.map(jnp.add, grads, micro_grads), metrics

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, metrics = jax.lax.scan(accumulate, zeros, mini_batch, unroll=micro_batches == 1)
            grads = jax.tree.map(lambda g: g / micro_batches, grads)
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(grad_norm)
            # A non-finite gradient would poison Adam's moments: skip the whole step, keep counting.
            safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
            updates, new_opt_state = optimizer.update(safe_grads, state.opt_state, state.params)
            new_params = optax.apply_updates(state.params, updates)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            state = TrainState(keep(new_params, state.params), keep(new_opt_state, state.opt_state))
            metrics = _reduce_metrics(metrics)
            metrics["grad_norm"] = grad_norm
            metrics["skipped_steps"] = (~finite).astype(jnp.float32)
            return state, metrics

        # A scan of length 1 is inlined (unroll): XLA does not fuse across a while loop's boundary
        # (bench.step's update alone: 0.84 -> 0.72 s in one same-session pair of runs on CPU).
        state, metrics = jax.lax.scan(optimizer_step, state, (batches, on_policy), unroll=mini_batches == 1)
        skipped = metrics.pop("skipped_steps").sum()
        grad_norms = metrics.pop("grad_norm")
        metrics = _reduce_metrics(metrics)
        metrics["skipped_steps"] = skipped
        # The mean over the steps that were taken (a skipped step's norm is inf/nan by definition).
        taken = jnp.isfinite(grad_norms)
        metrics["grad_norm"] = jnp.sum(jnp.where(taken, grad_norms, 0.0)) / jnp.maximum(taken.sum(), 1)
        real_tokens = jnp.maximum(jnp.sum(batch["response_mask"]), 1)
        if _DIFF_SUM in metrics:
            metrics["rollout/logprob_diff_mean"] = metrics.pop(_DIFF_SUM) / real_tokens
        metrics.update({k: metrics[k] / real_tokens for k in _TOKEN_MEANS if k in metrics})
        return state, metrics

    return LayerIndexed(update, graphdefs["policy"], lambda state, batch: state.params["policy"], kind="backward",
                        donate_argnums=0, out_shardings=(state_sharding, None) if state_sharding is not None else None)


def make_prepare_fn(
    graphdefs, algorithm: AlgorithmConfig, *, temperature: float = 1.0, chunks: int = 1, on_policy_chunks: int = 0,
    prompt_group: int = 0,
) -> Callable:
    """prepare(params, ref_params, rollout_arrays) -> dict with "old_logprobs" (and "old_values"
    for PPO, "ref_logprobs" when a KL term asks for it), from the exact training forward pass.
    Dispatched before the host checks rewards, so the two overlap. The rows go through in `chunks`
    (bounding memory; with a packed batch, one per micro-batch of the update: mini x micro). The
    first `on_policy_chunks` chunks' old log-probs are left 0 without a forward pass: they are the
    first mini-batch's, which the update computes itself (pass the update's micro_batches).
    `prompt_group` > 1: rows come in groups of that many responses to one prompt (chunks hold whole
    groups), and each group's prompt is run once (`batch_logprobs`)."""
    if not 0 <= on_policy_chunks <= chunks:
        raise ValueError(f"on_policy_chunks={on_policy_chunks} must be in [0, chunks={chunks}]")

    def prepare(params, ref_params, rollout: dict):
        policy = nnx.merge(graphdefs["policy"], params["policy"])

        def one_chunk(inputs):
            index, chunk = inputs
            zeros = jnp.zeros(chunk["response_mask"].shape, jnp.float32)
            # lax.map is a scan, so the cond really skips the forward pass of on-policy chunks.
            logprobs = lambda model: batch_logprobs(model, chunk, temperature, group_size=prompt_group)  # noqa: E731
            old = jax.lax.cond(index < on_policy_chunks, lambda: zeros, lambda: logprobs(policy))
            out = {"old_logprobs": old}
            if algorithm.name == "ppo":
                out["old_values"] = nnx.merge(graphdefs["critic"], params["critic"])(chunk, prompt_group)
            if ref_params is not None:
                out["ref_logprobs"] = logprobs(nnx.merge(graphdefs["policy"], ref_params))
            return out

        rows = rollout["response_ids"].shape[0]
        if on_policy_chunks == chunks and algorithm.name != "ppo" and ref_params is None:
            return {"old_logprobs": jnp.zeros(rollout["response_mask"].shape, jnp.float32)}  # nothing to compute
        chunked = {
            k: constrain(x.reshape(chunks, x.shape[0] // chunks, *x.shape[1:]), (None, "batch"))
            for k, x in rollout.items() if k in FORWARD_KEYS
        }
        out = jax.lax.map(one_chunk, (jnp.arange(chunks), chunked))
        return jax.tree.map(lambda x: x.reshape(rows, *x.shape[2:]), out)

    return LayerIndexed(prepare, graphdefs["policy"], lambda params, ref, rollout: params["policy"], kind="forward")


def make_sft_step(graphdef, optimizer: optax.GradientTransformation) -> Callable:
    """Supervised warm-up: maximise log pi(reference response | prompt) on masked tokens."""

    def loss_fn(params, batch):
        policy = nnx.merge(graphdef, params)
        logprobs = batch_logprobs(policy, batch)
        mask = batch["response_mask"]
        return -jnp.sum(logprobs) / jnp.maximum(jnp.sum(mask), 1)

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"sft/loss": loss, "sft/grad_norm": optax.tree.norm(grads)}

    return LayerIndexed(step, graphdef, lambda params, opt, batch: params, kind="backward", donate_argnums=(0, 1))
