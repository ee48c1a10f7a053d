"""The policy in and out of the trainer: built from an HF folder or a random init, restored from
a training checkpoint, and wrapped as the sampler that validation and `eval` call."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pacs_jax.checkpoint import Checkpointer
from pacs_jax.config import Config, ConfigError
from pacs_jax.data import Example, build_examples, load_rows
from pacs_jax.models import DecoderConfig, from_pretrained, init_decoder, read_hf_config
from pacs_jax.models.tokenizer import Tokenizer, load_tokenizer
from pacs_jax.sampler import SamplingParams, generate, pad_prompts
from pacs_jax.update import TrainState, init_train_state, make_train_optimizer


def load_policy(config: Config, tokenizer: Tokenizer):
    """The policy from model.path (HF folder) or a random init from model.arch."""
    m = config.model
    if m.path:
        read_hf_config(m.path)  # a missing folder or config.json fails here with the path
        return from_pretrained(m.path, dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat, train_layers=m.train_layers)
    arch = {"model_type": "llama", "vocab_size": tokenizer.vocab_size, **m.arch}
    if arch["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(f"model.arch.vocab_size={arch['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size}")
    decoder_config = DecoderConfig.from_hf(
        arch, source="model.arch", param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat,
        train_layers=m.train_layers,
    )
    return init_decoder(decoder_config, seed=config.trainer.seed)


def config_tokenizer(config: Config) -> Tokenizer:
    return load_tokenizer(config.model.tokenizer or config.model.path or "", config.model.chat_template)


def load_examples(source: str, config: Config, tokenizer: Tokenizer, name: str) -> list[Example]:
    rows = load_rows(source, config.data, name=name)
    examples, _ = build_examples(rows, tokenizer, config.data)
    return examples


def decode_responses(tokenizer: Tokenizer, response_ids: np.ndarray, response_mask: np.ndarray) -> list[str]:
    return [tokenizer.decode(ids[mask == 1].tolist()) for ids, mask in zip(response_ids, response_mask)]


def checkpoint_tree(state: TrainState, reference) -> dict:
    """What a training checkpoint holds: the train state, and GRPO's KL reference when it has one."""
    tree: dict[str, Any] = {"train": state}
    if reference is not None:
        tree["reference"] = reference
    return tree


def needs_reference(config: Config) -> bool:
    """Whether the run keeps (and checkpoints) a reference policy: GRPO's KL term, or the PACS score
    of paper v2 (algorithm.score_reference=reference)."""
    a = config.algorithm
    return (a.name == "grpo" and a.kl_coef > 0) or (a.name == "pacs" and a.score_reference == "reference")


def fresh_reference(state: TrainState, optimizer: optax.GradientTransformation, state_sharding) -> tuple[Any, Any]:
    """Paper v2's hard reset (after ProRL): (a copy of the current policy as the new reference, a fresh
    optimizer state). Fresh means Adam's moments and their bias-correction count start again; the
    learning-rate schedules' step counts (optax.ScaleByScheduleState) are kept, so a schedule goes on
    where it was instead of restarting its warm-up."""

    def fresh(state: TrainState):
        new = optimizer.init(state.params)
        schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
        opt_state = jax.tree.map(lambda n, old: old if schedule(n) else n, new, state.opt_state, is_leaf=schedule)
        return jax.tree.map(jnp.copy, state.params["policy"]), opt_state

    return jax.jit(fresh, out_shardings=(state_sharding.params["policy"], state_sharding.opt_state))(state)


def restore_policy(config: Config, checkpoint_dir: str, step: Optional[int] = None):
    """The policy of a training checkpoint (latest step by default), as an NNX Decoder."""
    tokenizer = config_tokenizer(config)
    policy = load_policy(config, tokenizer)
    optimizer = make_train_optimizer(config.algorithm, config.optimizer, config.trainer.total_steps * config.trainer.mini_batches)
    graphdefs, state = init_train_state(policy, optimizer, with_critic=config.algorithm.name == "ppo")
    reference = state.params["policy"] if needs_reference(config) else None
    with Checkpointer(checkpoint_dir, async_save=False) as checkpointer:
        tree, _ = checkpointer.restore(checkpoint_tree(state, reference), step)
    return nnx.merge(graphdefs["policy"], tree["train"].params["policy"]), tokenizer


def make_sample_fn(config: Config, tokenizer: Tokenizer, policy_split, key, greedy: bool = False):
    """sample_fn(examples, n, stream=None) -> per example n (text, length) pairs, with the eval sampling
    settings (greedy: temperature 0), in fixed-size batches (the last one padded with repeats) so every
    batch reuses one program. `stream`: an integer folded into the key, so separate calls (the chunks
    of a resumable evaluation) draw independent samples."""
    e = config.eval
    temperature, top_p = (0.0, 1.0) if greedy else (e.temperature, e.top_p)
    sampling = SamplingParams(e.max_new_tokens, temperature, top_p, 0, tuple(tokenizer.eos_ids), tokenizer.pad_id,
                              **config.rollout.engine_options())

    def sample_fn(examples: list[Example], n_samples: int, stream: Optional[int] = None):
        base = key if stream is None else jax.random.fold_in(key, stream)
        results = []
        for start in range(0, len(examples), e.prompts_per_batch):
            chunk = examples[start : start + e.prompts_per_batch]
            padded = chunk + [chunk[-1]] * (e.prompts_per_batch - len(chunk))
            ids, mask = pad_prompts([x.prompt_ids for x in padded], config.rollout.prompt_buckets, tokenizer.pad_id)
            out = generate(policy_split, ids, mask, jax.random.fold_in(base, start), sampling, n_samples)
            response_ids, response_mask = jax.device_get((out.response_ids, out.response_mask))
            texts = decode_responses(tokenizer, response_ids, response_mask)
            lengths = response_mask.sum(axis=1)
            for i in range(len(chunk)):
                rows = range(i * n_samples, (i + 1) * n_samples)
                results.append([(texts[j], int(lengths[j])) for j in rows])
        return results

    return sample_fn
