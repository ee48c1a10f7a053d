"""The policy in and out of the trainer: built from an HF folder or a random init, restored from
a training checkpoint, and wrapped as the sampler that validation and `eval` call."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from pacs_jax import sharding
from pacs_jax.checkpoint import Checkpointer
from pacs_jax.config import Config, ConfigError
from pacs_jax.data import Example, build_examples, load_rows
from pacs_jax.models import Decoder, DecoderConfig, from_pretrained, init_decoder
from pacs_jax.models.hf import hf_decoder_config, save_hf_params
from pacs_jax.models.tokenizer import Tokenizer, load_tokenizer
from pacs_jax.sampler import SamplingParams, generate, pad_prompts
from pacs_jax.update import TrainState, init_train_state


def policy_config(config: Config, tokenizer: Tokenizer) -> DecoderConfig:
    """The policy's architecture: model.path's config.json, or model.arch (reads no weights)."""
    m = config.model
    if m.path:
        return hf_decoder_config(m.path, m.param_dtype, m.compute_dtype, m.remat, m.train_layers, m.attention, m.attention_block)
    arch = {"model_type": "llama", "vocab_size": tokenizer.vocab_size, **m.arch}
    if arch["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(f"model.arch.vocab_size={arch['vocab_size']} is smaller than the tokenizer's {tokenizer.vocab_size}")
    return DecoderConfig.from_hf(
        arch, source="model.arch", param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat,
        train_layers=m.train_layers, attention=m.attention, attention_block=m.attention_block,
    )


def load_policy(config: Config, tokenizer: Tokenizer, mesh: Optional[jax.sharding.Mesh] = None) -> Decoder:
    """The policy from model.path (HF folder) or a random init from model.arch. With `mesh`, every
    parameter goes straight into its shards (sharding.LOGICAL_AXIS_RULES): each host reads only
    its devices' blocks of the safetensors, and a random init runs under jit with sharded outputs,
    so no device holds a whole copy. Without, whole arrays on the default device."""
    decoder_config = policy_config(config, tokenizer)
    shardings_for = None if mesh is None else (lambda state: sharding.param_shardings(state, mesh))
    if config.model.path:
        return from_pretrained(config.model.path, dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype,
                               remat=config.model.remat, train_layers=config.model.train_layers, shardings_for=shardings_for,
                               attention=config.model.attention, attention_block=config.model.attention_block)
    if mesh is None:
        return init_decoder(decoder_config, seed=config.trainer.seed)
    graphdef = nnx.graphdef(abstract_policy(decoder_config))
    state = sharding.init_sharded(lambda: nnx.state(init_decoder(decoder_config, seed=config.trainer.seed)), mesh)
    return nnx.merge(graphdef, state)


def abstract_policy(decoder_config: DecoderConfig) -> Decoder:
    """The decoder with ShapeDtypeStructs for arrays: its structure, shapes and dtypes, no memory."""
    return nnx.eval_shape(lambda: Decoder(decoder_config, rngs=nnx.Rngs(0)))


def abstract_train_state(decoder_config: DecoderConfig, optimizer: optax.GradientTransformation,
                         with_critic: bool) -> tuple[dict, TrainState]:
    """(graphdefs, train state of ShapeDtypeStructs), as `init_train_state` builds them."""
    graphdefs = {}

    def build():
        built, state = init_train_state(Decoder(decoder_config, rngs=nnx.Rngs(0)), optimizer, with_critic)
        graphdefs.update(built)
        return state

    return graphdefs, jax.eval_shape(build)


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


def restore_policy(config: Config, checkpoint_dir: str, step: Optional[int] = None,
                   placement: Optional[jax.sharding.Mesh | jax.Device] = None) -> tuple[Decoder, Tokenizer]:
    """The policy of a training checkpoint (latest step by default), as an NNX Decoder, and the
    tokenizer. Only the policy's parameters are read (the optimizer state, a critic or a reference
    are not), so any run restores whatever its algorithm and optimizer were, given its model.
    `placement`: a mesh (sharded as the trainer shards it), or one device (whole there; the first
    device by default)."""
    tokenizer = config_tokenizer(config)
    graphdef, abstract = nnx.split(abstract_policy(policy_config(config, tokenizer)))
    if isinstance(placement, jax.sharding.Mesh):
        shardings = sharding.param_shardings(abstract, placement)
    else:
        device = jax.sharding.SingleDeviceSharding(placement or jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with Checkpointer(checkpoint_dir, async_save=False) as checkpointer:
        tree = checkpointer.restore_part({"train": {"params": {"policy": target}}}, step)
    return nnx.merge(graphdef, tree["train"]["params"]["policy"]), tokenizer


def export_hf(policy: Decoder, folder: str, tokenizer_dir: str = "") -> str:
    """The policy as an HF folder (config.json, model.safetensors in float32, the tokenizer's files
    when `tokenizer_dir` is a folder), written by process 0; `folder` may be gs://. Every process
    must call it: each parameter is gathered whole from the hosts holding its shards, one at a
    time, so a host never holds more than the model once (process 0) or one parameter (the others)."""
    main = jax.process_index() == 0

    def gather(x):
        whole = sharding.to_host(x)  # a collective: every process takes part
        return np.asarray(whole, np.float32) if main else None

    gathered = jax.tree.map(gather, nnx.to_pure_dict(nnx.state(policy, nnx.Param)))
    if main:
        tokenizer = tokenizer_dir if tokenizer_dir and Path(tokenizer_dir).is_dir() else None
        if "://" not in folder:
            save_hf_params(policy.config, gathered, folder, tokenizer)
        else:
            with tempfile.TemporaryDirectory() as local:
                save_hf_params(policy.config, gathered, local, tokenizer)
                target = epath.Path(folder)
                target.mkdir(parents=True, exist_ok=True)
                for path in sorted(Path(local).iterdir()):
                    (target / path.name).write_bytes(path.read_bytes())
    return folder


def make_sample_fn(config: Config, tokenizer: Tokenizer, policy_split, key, greedy: bool = False,
                   mesh: Optional[jax.sharding.Mesh] = None):
    """sample_fn(examples, n, stream=None) -> per example n (text, length) pairs, with the eval sampling
    settings (greedy: temperature 0), in fixed-size batches (the last one padded with repeats) so every
    batch reuses one program. `stream`: an integer folded into the key, so separate calls (the chunks
    of a resumable evaluation) draw independent samples."""
    e = config.eval
    temperature, top_p = (0.0, 1.0) if greedy else (e.temperature, e.top_p)
    sampling = SamplingParams(e.max_new_tokens, temperature, top_p, 0, tuple(tokenizer.eos_ids), tokenizer.pad_id,
                              **config.rollout.engine_options())
    # With `mesh` the prompts are split over its data x fsdp devices as the trainer's rollout splits
    # them (each process feeds its own rows): a batch is a multiple of that split.
    ways = 1 if mesh is None else sharding.batch_size_divisor(mesh)
    batch = -(-e.prompts_per_batch // ways) * ways

    def place(ids, mask):
        if mesh is None:
            return ids, mask
        first, last = sharding.process_slice(len(ids), mesh)
        placed = sharding.shard_batch({"ids": ids[first:last], "mask": mask[first:last]}, mesh)
        return placed["ids"], placed["mask"]

    def sample_fn(examples: list[Example], n_samples: int, stream: Optional[int] = None):
        base = key if stream is None else jax.random.fold_in(key, stream)
        results = []
        for start in range(0, len(examples), e.prompts_per_batch):
            chunk = examples[start : start + e.prompts_per_batch]
            padded = chunk + [chunk[-1]] * (batch - len(chunk))
            ids, mask = place(*pad_prompts([x.prompt_ids for x in padded], config.rollout.prompt_buckets, tokenizer.pad_id))
            out = generate(policy_split, ids, mask, jax.random.fold_in(base, start), sampling, n_samples)
            response_ids, response_mask = sharding.to_host((out.response_ids, out.response_mask))
            texts = decode_responses(tokenizer, response_ids, response_mask)
            lengths = response_mask.sum(axis=1)
            for i in range(len(chunk)):
                rows = range(i * n_samples, (i + 1) * n_samples)
                results.append([(texts[j], int(lengths[j])) for j in rows])
        return results

    return sample_fn
