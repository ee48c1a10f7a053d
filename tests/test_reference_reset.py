"""Paper v2's PACS score against a reference policy (algorithm.score_reference=reference) and its
hard resets (algorithm.reference_reset_every): the update's loss and gradient are a float64
transcription of v2's Eqs. 6-8, a reset copies the policy and restarts Adam but not the
learning-rate schedule, and a run resumed across a reset equals the uninterrupted run bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pacs_jax.checkpoint import Checkpointer
from pacs_jax.config import AlgorithmConfig, ConfigError, OptimizerConfig
from pacs_jax.models import DecoderConfig, init_decoder
from pacs_jax.policy import checkpoint_tree, config_tokenizer, fresh_reference, load_policy
from pacs_jax.sampler import SamplingParams, generate, pad_prompts
from pacs_jax.train import train
from pacs_jax.update import (
    ROLLOUT_KEYS, TrainState, init_train_state, make_prepare_fn, make_train_optimizer, make_update_fn,
    response_logprobs,
)
from test_train import assert_same_metrics, read_metrics, tiny_config

CONFIG = DecoderConfig.from_hf(dict(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, model_type="llama",
))
GROUP, PROMPTS = 4, 4
V2 = ["algorithm.score_reference=reference"]


# ------------------------------------------------------------------------------ the score


def v2_loss_and_logprob_gradient(logp, ref_logp, mask, rewards, group, beta):
    """Float64 transcription of v2's Eqs. 6-8 with the class weights (PACS.md):
    r_hat_i = beta sum_t m (log pi_theta - log pi_ref)                    (7)
    psi_i = r_hat_i - mean_{j != i in i's group} r_hat_j                   (6)
    L = mean_i w_i [softplus(psi_i) - r_i psi_i]                           (8)
    and dL/dlog pi_theta(o_it), written out by hand."""
    logp, ref_logp, mask, rewards = (np.asarray(x, np.float64) for x in (logp, ref_logp, mask, rewards))
    n = len(rewards)
    r_hat = beta * ((logp - ref_logp) * mask).sum(axis=1)
    psi, weights = np.zeros(n), np.ones(n)
    for start in range(0, n, group):
        g = slice(start, start + group)
        psi[g] = [r_hat[g][i] - (r_hat[g].sum() - r_hat[g][i]) / (group - 1) for i in range(group)]
        correct = rewards[g].sum()
        if 0 < correct < group:
            weights[g] = np.where(rewards[g] > 0.5, group / (2 * correct), group / (2 * (group - correct)))
    sigmoid = 1 / (1 + np.exp(-psi))
    loss = np.mean(weights * (np.log1p(np.exp(psi)) - rewards * psi))
    dpsi = weights * (sigmoid - rewards) / n  # dL/dpsi_i
    dr_hat = np.zeros(n)
    for start in range(0, n, group):
        g = slice(start, start + group)
        dr_hat[g] = dpsi[g] - (dpsi[g].sum() - dpsi[g]) / (group - 1)
    return loss, r_hat, beta * dr_hat[:, None] * mask


@pytest.fixture(scope="module")
def rollout():
    model = init_decoder(CONFIG, seed=0)
    rng = np.random.default_rng(0)
    ids, mask = pad_prompts([list(rng.integers(3, 61, n)) for n in (3, 5, 2, 6)], [8], 0)
    out = generate(model, ids, mask, jax.random.key(0), SamplingParams(8, temperature=1.0, stop_ids=(3, 4, 5)), group_size=GROUP)
    rewards = np.array([1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 0, 1, 1], np.float32)  # mixed and single-label groups
    return {**{k: getattr(out, k) for k in ROLLOUT_KEYS}, "rewards": jnp.asarray(rewards)}


def test_update_with_a_reference_is_v2s_equations_in_float64(rollout):
    beta = 0.5
    algorithm = AlgorithmConfig(name="pacs", beta=beta, score_reference="reference")
    sgd = optax.multi_transform({"policy": optax.sgd(1.0)}, lambda p: {k: k for k in p})  # delta = -gradient
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), sgd, with_critic=False)
    # A reference near the policy (a few updates away), so the score is neither 0 nor saturated.
    noise = jax.tree.map(lambda x, k: 0.05 * jax.random.normal(k, x.shape, x.dtype), state.params["policy"],
                         jax.tree.unflatten(jax.tree.structure(state.params["policy"]),
                                            list(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.params["policy"]))))))
    reference = jax.tree.map(jnp.add, state.params["policy"], noise)
    prepare = make_prepare_fn(graphdefs, algorithm, chunks=1, on_policy_chunks=1)
    batch = {**rollout, **prepare(state.params, reference, {k: rollout[k] for k in ROLLOUT_KEYS})}
    assert "ref_logprobs" in batch  # the reference pass ran

    args = [rollout[k] for k in ROLLOUT_KEYS]
    policy_lp = lambda params: response_logprobs(nnx.merge(graphdefs["policy"], params), *args)  # noqa: E731
    logp, vjp = jax.vjp(policy_lp, state.params["policy"])
    ref_logp = policy_lp(reference)
    loss, r_hat, dlogp = v2_loss_and_logprob_gradient(logp, ref_logp, rollout["response_mask"], rollout["rewards"], GROUP, beta)
    assert np.abs(r_hat).max() > 0.1  # the reference really differs: on the first mini-batch v1's score is 0
    (expected_grad,) = vjp(jnp.asarray(dlogp, jnp.float32))

    update = make_update_fn(graphdefs, sgd, algorithm, group_size=GROUP, mini_batches=1, micro_batches=1)
    before = jax.tree.map(np.asarray, state.params["policy"])
    new_state, metrics = update(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["pacs/score_mean"]), r_hat.mean(), rtol=1e-4, atol=1e-6)
    got = jax.tree.map(lambda b, a: b - np.asarray(a), before, new_state.params["policy"])
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected_grad)):
        np.testing.assert_allclose(g, np.asarray(e), rtol=2e-4, atol=1e-7)


# ------------------------------------------------------------------------------ the reset


def test_reset_copies_the_policy_and_restarts_adam_but_not_the_schedule():
    # A warm-up schedule: restarting its count would drop the learning rate back to ~0.
    config = OptimizerConfig(lr=1e-2, warmup_steps=10, grad_clip=0.0, weight_decay=0.0)
    optimizer = make_train_optimizer(AlgorithmConfig(), config, 100)
    graphdefs, state = init_train_state(init_decoder(CONFIG, seed=0), optimizer, with_critic=False)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), state.params)
    step = jax.jit(optimizer.update)  # one program, not op-by-op dispatch
    for _ in range(4):
        updates, opt_state = step(grads, state.opt_state, state.params)
        state = TrainState(optax.apply_updates(state.params, updates), opt_state)
    sharding = jax.tree.map(lambda x: x.sharding, state)
    reference, opt_state = fresh_reference(state, optimizer, sharding)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(state.params["policy"])):
        np.testing.assert_array_equal(a, b)
    counts = [int(x) for x in jax.tree.leaves(opt_state) if x.ndim == 0]
    assert sorted(counts) == [0, 4]  # Adam's count restarted; the schedule's kept

    # The next step, with the gradient turned around, in float64: Adam from zero moments (bias
    # correction at count 1: the update is -lr g / (|g| + eps), +lr here; the old moments would still
    # point the other way) at the schedule's learning rate of its 5th step (4 / 10 of lr; 0 restarted).
    g = -0.1
    expected = -(4 / 10 * 1e-2) * g / (np.sqrt(g * g) + config.eps)
    updates, _ = step(jax.tree.map(lambda x: jnp.full_like(x, g), state.params), opt_state, state.params)
    for u in jax.tree.leaves(updates):
        np.testing.assert_allclose(np.asarray(u, np.float64), expected, rtol=2e-5)


@pytest.mark.parametrize("override, message", [
    (["algorithm.reference_reset_every=10"], "algorithm.score_reference=reference"),
    (["algorithm.name=ppo", "algorithm.score_reference=reference"], "algorithm.score_reference='reference' is a PACS option"),
    (V2 + ['algorithm.reward_method="2"'], "reward_method"),
    (V2 + ["algorithm.reference_reset_every=-1"], "algorithm.reference_reset_every must be >= 0"),
    (["algorithm.score_reference=ref"], "algorithm.score_reference"),
])
def test_bad_reference_settings_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, *override)


def test_grpo_with_a_kl_reference_may_reset_it(tmp_path):
    tiny_config(tmp_path, "algorithm.name=grpo", "algorithm.kl_coef=0.1", "algorithm.reference_reset_every=5")


def _checkpoint(config, directory, step):
    tokenizer = config_tokenizer(config)
    optimizer = make_train_optimizer(config.algorithm, config.optimizer, config.trainer.total_steps * config.trainer.mini_batches)
    _, state = init_train_state(load_policy(config, tokenizer), optimizer, with_critic=False)
    with Checkpointer(str(directory), async_save=False) as checkpointer:
        tree, meta = checkpointer.restore(checkpoint_tree(state, state.params["policy"]), step)
    return jax.tree.map(np.asarray, tree), meta


def test_resume_across_a_reset_equals_the_uninterrupted_run(tmp_path):
    reset = [*V2, "algorithm.reference_reset_every=2", "trainer.save_every=1", "trainer.keep_last=10"]
    straight = tiny_config(tmp_path / "straight", *reset, "trainer.total_steps=5")
    train(straight)
    records = read_metrics(tmp_path / "straight")
    assert [r["pacs/reference_resets"] for r in records] == [0, 1, 1, 2, 2]
    assert [r["pacs/reference_age"] for r in records] == [1, 0, 1, 0, 1]
    assert abs(records[1]["pacs/score_mean"]) > 0  # step 2 scores against step 0's policy (v1's: 0 on its first mini-batch)

    # The checkpoint of a reset step holds the new reference (that step's policy) and fresh Adam moments.
    tree, _ = _checkpoint(straight, tmp_path / "straight" / "checkpoints", 2)
    for a, b in zip(jax.tree.leaves(tree["reference"]), jax.tree.leaves(tree["train"].params["policy"])):
        np.testing.assert_array_equal(a, b)
    adam = [x for x in jax.tree.leaves(tree["train"].opt_state) if x.ndim > 0]
    assert adam and all(not x.any() for x in adam)
    tree3, _ = _checkpoint(straight, tmp_path / "straight" / "checkpoints", 3)
    assert any((a != b).any() for a, b in zip(jax.tree.leaves(tree3["reference"]), jax.tree.leaves(tree3["train"].params["policy"])))

    # Interrupted after step 3 (between the resets at 2 and 4), resumed to 5.
    train(tiny_config(tmp_path / "split", *reset, "trainer.total_steps=3"))
    resumed = tiny_config(tmp_path / "split", *reset, "trainer.total_steps=5")
    assert train(resumed)["step"] == 5
    assert_same_metrics(records, read_metrics(tmp_path / "split"))
    final, _ = _checkpoint(straight, tmp_path / "straight" / "checkpoints", 5)
    split, _ = _checkpoint(resumed, tmp_path / "split" / "checkpoints", 5)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(split)):
        np.testing.assert_array_equal(a, b)
