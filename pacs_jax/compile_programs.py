"""The abstract inputs of the programs `python -m pacs_jax compile` compiles (compile_tpu.py): the
architecture (from --arch, model.path or model.arch; no weights read), the train state as shapes
placed on the mesh, the rollout's prompts and sampling parameters, the old-log-prob pass's and the
update's batches as the trainer builds them (padded, shared-prompt or packed rows, with the packed
shape planned from assumed RLVR lengths), the jitted functions to lower, and each program's
analytic matmul FLOPs. Nothing here compiles, except the compacting rollout's chain of programs,
whose later inputs take the shardings the first one's compile hands on."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Optional

from pacs_jax.compile_report import ProgramReport, compile_program
from pacs_jax.config import Config, ConfigError
from pacs_jax.tpu_topology import TpuTopology

PROGRAMS = ("load", "init", "rollout", "old_logprobs", "update")


def decoder_config_for(config: Config, arch_file: str = ""):
    """The architecture, from --arch (a config.json-style file), model.path's config.json, or
    model.arch, with the config's dtypes and remat. Reads no weights."""
    from pacs_jax.models import DecoderConfig, read_hf_config

    m = config.model
    if arch_file:
        path = Path(arch_file)
        if not path.is_file():
            raise ConfigError(f"--arch {arch_file}: no such file (see configs/arch/ for Qwen2.5-3B / 7B)")
        hf, source = json.loads(path.read_text()), str(path)
    elif m.path:
        if not (Path(m.path) / "config.json").is_file():
            raise ConfigError(
                f"model.path={m.path} has no config.json (the model is not downloaded here); pass its "
                f"architecture instead, e.g. --arch configs/arch/qwen2.5-7b.json"
            )
        hf, source = read_hf_config(m.path), f"{m.path}/config.json"
    else:
        hf, source = {"model_type": "llama", **m.arch}, "model.arch"
        tokenizer = _local_tokenizer(m.tokenizer, m.chat_template)
        if tokenizer is not None:
            # As the trainer builds it: the tokenizer's vocabulary unless model.arch asks for more.
            hf.setdefault("vocab_size", tokenizer.vocab_size)
            hf.setdefault("eos_token_id", list(tokenizer.eos_ids))
            if hf["vocab_size"] < tokenizer.vocab_size:
                raise ConfigError(f"model.arch.vocab_size={hf['vocab_size']} is smaller than the tokenizer's "
                                  f"{tokenizer.vocab_size}; remove it or raise it")
        if "vocab_size" not in hf:
            raise ConfigError(
                f"model.arch needs vocab_size to compile: model.tokenizer={m.tokenizer!r} is not here to read it "
                f"from; set model.arch.vocab_size (e.g. model.arch.vocab_size=32000) or model.tokenizer=char"
            )
    # The programs are for the TPU, though traced here on a CPU host: "auto" means scan there.
    config = DecoderConfig.from_hf(hf, source=source, param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat,
                                   train_layers="scan" if m.train_layers == "auto" else m.train_layers,
                                   # "auto" resolves when the programs are traced for the TPU (splash)
                                   attention=m.attention, attention_block=m.attention_block)
    return config, hf


def _local_tokenizer(spec: str, chat_template: str):
    """The tokenizer `spec` names when it needs nothing from elsewhere ("char", or a folder or
    .model file on this machine), else None: compiling never downloads."""
    from pacs_jax.models.tokenizer import load_tokenizer

    if spec != "char" and not (spec and not spec.startswith("gs://") and Path(spec).expanduser().exists()):
        return None
    return load_tokenizer(spec, chat_template)


def matmul_weights(decoder_config) -> int:
    """Weights a token's forward pass multiplies with (the LM head included, the embedding lookup not)."""
    c = decoder_config
    attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * (attention + mlp) + c.hidden_size * c.vocab_size


def abstract_train_state(decoder_config, config: Config):
    """(graphdefs, optimizer, train state of ShapeDtypeStructs) exactly as the trainer builds them."""
    import jax
    from flax import nnx

    from pacs_jax.models.llama import Decoder
    from pacs_jax.update import init_train_state, make_train_optimizer

    t = config.trainer
    optimizer = make_train_optimizer(config.algorithm, config.optimizer, t.total_steps * t.mini_batches)
    graphdefs = {}

    def build():
        policy = Decoder(decoder_config, rngs=nnx.Rngs(params=t.seed))
        built_graphdefs, state = init_train_state(policy, optimizer, with_critic=config.algorithm.name == "ppo")
        graphdefs.update(built_graphdefs)
        return state

    return graphdefs, optimizer, jax.eval_shape(build)


def placed(abstract, shardings):
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# The lengths `compile` assumes when it sizes packed rows (trainer.pack_row_tokens): responses from
# the `rlvr` distribution of bench/rollout_lengths.py (log-normal, mean a quarter of
# rollout.max_new_tokens, 3% of rows at the cap: RLVR runs on maths), drawn with PACK_SEED, after
# prompts of PACK_PROMPT_TOKENS tokens (a maths problem in a chat template). The trainer packs each
# micro-batch first-fit-decreasing and sizes every micro-batch by the fullest one; `compile` plans
# that draw the same way, adds PACK_MARGIN for other draws and rounds up to the trainer's ladder.
PACK_PROMPT_TOKENS = 150
PACK_SEED = 0
PACK_MARGIN = 0.10
_RLVR_Z = 1.8808  # the standard normal's 97% quantile: 3% of rows reach the cap


def rlvr_response_lengths(rows: int, cap: int, seed: int = PACK_SEED):
    """bench/rollout_lengths.py's `rlvr` lengths (the same draw for the same seed), 1 .. cap."""
    import numpy as np

    # Log-normal with mean cap / 4 and P(X >= cap) = 3%: sigma solves ln 4 + sigma^2 / 2 = z sigma.
    sigma = _RLVR_Z - math.sqrt(_RLVR_Z**2 - 2 * math.log(4))
    mu = math.log(cap / 4) - sigma**2 / 2
    lengths = np.ceil(np.random.default_rng(seed).lognormal(mu, sigma, rows))
    return np.clip(lengths, 1, cap).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PackedShape:
    """The packed batch `compile` assumes: micro_batches x rows_per_micro rows of row_tokens."""

    row_tokens: int
    micro_batches: int  # mini x micro: each packs its own rows
    sequences_per_micro: int
    rows_per_micro: int
    fullest_rows: int  # rows the fullest micro-batch of the assumed draw needs
    mean_rows: float  # rows a micro-batch of that draw needs on average
    mean_response_tokens: float

    @property
    def rows(self) -> int:
        return self.micro_batches * self.rows_per_micro


def packed_shape(config: Config, prompt_len: int, row_multiple: int) -> PackedShape:
    """The packed shape the trainer would run on the assumed lengths: pacs_jax.packing's plan of each
    micro-batch, the fullest one x (1 + PACK_MARGIN), rounded up to the trainer's ladder (which also
    rounds to the data x fsdp split)."""
    from pacs_jax.packing import first_fit_decreasing, row_ladder

    t, r = config.trainer, config.rollout
    micro = t.mini_batches * t.micro_batches
    total = t.prompts_per_step * r.group_size
    per_micro = total // micro
    responses = rlvr_response_lengths(total, r.max_new_tokens)
    lengths = min(PACK_PROMPT_TOKENS, prompt_len) + responses
    needed = [first_fit_decreasing(lengths[m * per_micro : (m + 1) * per_micro], t.pack_row_tokens)[2] for m in range(micro)]
    wanted = math.ceil(max(needed) * (1 + PACK_MARGIN))
    ladder = row_ladder(per_micro, row_multiple)
    return PackedShape(t.pack_row_tokens, micro, per_micro, next((n for n in ladder if n >= wanted), ladder[-1]),
                       max(needed), sum(needed) / micro, float(responses.mean()))



def prepare_chunk_count(config: Config) -> int:
    """Chunks for the old-log-prob pass: as many rows per forward as one gradient micro-batch,
    so that whatever fits the update's activations fits this forward-only pass too."""
    return config.trainer.mini_batches * config.trainer.micro_batches


@dataclasses.dataclass
class StepInputs:
    """One RL step's programs as shapes on a mesh: the functions to lower and their arguments."""

    graphdefs: dict
    state: Any  # the train state, ShapeDtypeStructs placed as the trainer places it
    sampling: Any  # rollout.SamplingParams, "auto" resolved for TPU
    key: Any
    prompt_arrays: tuple  # the rollout's (prompt ids, prompt mask)
    rollout_arrays: dict  # the old-log-prob pass's batch (the rollout, + the packed layout)
    update_batch: dict  # + rewards, old and sampler log-probs (+ reference log-probs, PPO values)
    prepare: Any  # update.make_prepare_fn's jitted function
    update: Any  # update.make_update_fn's jitted function
    needs_reference: bool
    packed: Optional[PackedShape]
    shared: bool  # each group's prompt runs once (update.per_response_token decides it the same way)
    prompt_len: int
    response_len: int
    prepare_chunks: int

    @property
    def policy_params(self):
        return self.state.params["policy"]


def step_inputs(config: Config, decoder_config, hf: dict, mesh) -> StepInputs:
    """The rollout's, the old-log-prob pass's and the update's inputs of `config` on `mesh`, exactly
    as pacs_jax/train.py builds them; the rollout as `rollout.engine` runs on TPU (`auto` = static),
    the other two on packed rows when `trainer.pack_row_tokens` is set."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from pacs_jax import sharding
    from pacs_jax.models.shared_prompt import shares_prompts
    from pacs_jax.packing import PACKED_KEYS
    from pacs_jax.sampler import SamplingParams, pick_bucket
    from pacs_jax.update import make_prepare_fn, make_update_fn

    t, r, a = config.trainer, config.rollout, config.algorithm
    graphdefs, optimizer, abstract_state = abstract_train_state(decoder_config, config)
    state_sharding = sharding.train_state_shardings(abstract_state, mesh)
    state = placed(abstract_state, state_sharding)

    prompts, rows = t.prompts_per_step, t.prompts_per_step * r.group_size
    prompt_len, response_len = pick_bucket(config.data.max_prompt_tokens, r.prompt_buckets), r.max_new_tokens
    rows_sharding = sharding.batch_sharding(mesh)

    def batch_array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=rows_sharding)

    eos = hf.get("eos_token_id", 0)
    stop_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
    engine = r.engine_options()
    # "auto" resolves by the platform that runs the program: TPU here, whatever this host is.
    if engine["decode_layers"] == "auto":
        engine["decode_layers"] = "scan"
    if engine["engine"] == "auto":
        engine["engine"] = "static"
    sampling = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k, stop_ids, pad_id=stop_ids[0], **engine)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    prompt_arrays = (batch_array((prompts, prompt_len), jnp.int32), batch_array((prompts, prompt_len), jnp.int32))

    # The batches as the trainer builds them (pacs_jax/train.py): the rollout, the packed layout
    # when packing, and for the update the rewards, old log-probs and the sampler's log-probs.
    rollout_arrays = {
        "prompt_ids": batch_array((rows, prompt_len), jnp.int32),
        "prompt_mask": batch_array((rows, prompt_len), jnp.int32),
        "response_ids": batch_array((rows, response_len), jnp.int32),
        "response_mask": batch_array((rows, response_len), jnp.int32),
    }
    packed = packed_shape(config, prompt_len, sharding.batch_size_divisor(mesh)) if t.pack_row_tokens else None
    if packed:
        shapes = {"packed_ids": (packed.rows, packed.row_tokens), "segment_ids": (packed.rows, packed.row_tokens),
                  "positions": (packed.rows, packed.row_tokens), "take": (rows, response_len)}
        rollout_arrays.update({k: batch_array(shapes[k], jnp.int32) for k in PACKED_KEYS})
    from pacs_jax.policy import needs_reference as keeps_reference  # GRPO's KL term, PACS's v2 score

    needs_reference = keeps_reference(config)
    update_batch = {**rollout_arrays, "rewards": batch_array((rows,), jnp.float32), "truncated": batch_array((rows,), jnp.float32),
                    "old_logprobs": batch_array((rows, response_len), jnp.float32),
                    "sampler_logprobs": batch_array((rows, response_len), jnp.float32)}
    if needs_reference:
        update_batch["ref_logprobs"] = batch_array((rows, response_len), jnp.float32)
    if a.name == "ppo":
        update_batch["old_values"] = batch_array((rows, response_len), jnp.float32)

    # As the trainer: the old-log-prob pass runs over the same rows per forward as one gradient
    # micro-batch, and skips the first mini-batch's chunks (the update computes those on-policy).
    prepare_chunks = prepare_chunk_count(config)
    prepare = make_prepare_fn(graphdefs, a, temperature=r.temperature, chunks=prepare_chunks,
                              on_policy_chunks=t.micro_batches, prompt_group=r.group_size if t.shared_prompts else 0)
    update = make_update_fn(
        graphdefs, optimizer, a, group_size=r.group_size, mini_batches=t.mini_batches,
        micro_batches=t.micro_batches, temperature=r.temperature, state_sharding=state_sharding,
        shared_prompts=t.shared_prompts,
    )
    # As the passes decide it per micro-batch (update.per_response_token).
    shared = t.shared_prompts and shares_prompts(rows // (t.mini_batches * t.micro_batches), r.group_size,
                                                 sharding.batch_size_divisor(mesh))
    return StepInputs(graphdefs, state, sampling, key, prompt_arrays, rollout_arrays, update_batch, prepare, update,
                      needs_reference, packed, bool(shared), prompt_len, response_len, prepare_chunks)


def model_flops(config: Config, decoder_config, inputs: StepInputs, chips: int) -> dict[str, float]:
    """Analytic matmul FLOPs per chip of each program (2 x weights x tokens per forward pass);
    XLA's own count sees each loop body once."""
    t, r, a = config.trainer, config.rollout, config.algorithm
    weights = matmul_weights(decoder_config)
    prompts, rows = t.prompts_per_step, t.prompts_per_step * r.group_size
    prompt_len, response_len, packed = inputs.prompt_len, inputs.response_len, inputs.packed
    networks = 2 if a.name == "ppo" else 1  # PPO's critic is a second decoder
    if packed:
        forward_tokens = packed.rows * packed.row_tokens
    elif inputs.shared:
        forward_tokens = prompts * prompt_len + rows * response_len  # each group's prompt once
    else:
        forward_tokens = rows * (prompt_len + response_len)
    policy_forwards = 1 - t.micro_batches / inputs.prepare_chunks  # the first mini-batch's chunks are skipped
    backward_factor = 4 if decoder_config.remat != "none" else 3  # forward + backward (2x) + recompute
    return {
        "rollout": 2 * weights * (prompts * prompt_len + rows * response_len) / chips,
        "old_logprobs": 2 * weights * forward_tokens * (policy_forwards + networks - 1 + inputs.needs_reference) / chips,
        "update": 2 * weights * forward_tokens * backward_factor * networks / chips,
    }


def compile_slots_rollout(graphdef, policy_params, prompt_arrays, key, sampling, group_size: int,
                          topology: TpuTopology, weights: int) -> list[ProgramReport]:
    """The slot engine's programs (pacs_jax/sampler/slots.py), lowered with the shardings `_start`
    hands on (as at run time): `_start` (every prompt prefilled once into the prompt bank, the
    slots filled with the first rows), `_decode` at the slot count (decode steps, each refilling
    the slots whose response stopped from the bank: it holds the slot cache, the bank and the
    output), `_finish`. Decode's model FLOPs are per HOST_EVERY steps over every slot."""
    import jax
    import jax.numpy as jnp

    from pacs_jax.sampler import slots

    chips, hbm = topology.chips, topology.hbm_bytes
    prompts, prompt_len = prompt_arrays[0].shape
    end = jax.ShapeDtypeStruct((), jnp.int32, sharding=key.sharding)  # the decode step a call stops at
    started = []
    report, compiled = compile_program("rollout _start", lambda: started.append(slots._start.lower(
        graphdef, policy_params, *prompt_arrays, params=sampling, group_size=group_size, slots=sampling.slots,
        unrolled=False)) or started[0], hbm, 2 * weights * prompts * prompt_len / chips)
    if compiled is None:
        return [report]
    # The bank and the slots as _start hands them on: its shapes, XLA's shardings.
    _, bank, loop = jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=s),
                                 started[0].out_info, compiled.output_shardings)
    return [
        report,
        compile_program(f"rollout _decode {sampling.slots} slots", lambda: slots._decode.lower(
            graphdef, policy_params, None, bank, loop, key, end, None, params=sampling, group_size=group_size),
            hbm, 2 * weights * sampling.slots * slots.HOST_EVERY / chips)[0],
        compile_program("rollout _finish", lambda: slots._finish.lower(
            loop, *prompt_arrays, params=sampling, group_size=group_size), hbm, 0.0)[0],
    ]


def compile_compact_rollout(graphdef, policy_params, prompt_arrays, key, sampling, group_size: int,
                             topology: TpuTopology, weights: int) -> list[ProgramReport]:
    """The compacting engine's programs (pacs_jax/sampler/compact.py), lowered with the shardings `_start`
    hands on (as at run time): `_start`; `_decode` at the full batch and at the smallest bucket, in
    the last segment (the widest attention window); `_regroup` from the full batch to the largest
    bucket rollout.compact_max_keep allows (its worst case: both batches' caches, the old one an
    argument, the new one an output; a later regroup starts from fewer rows) and to the smallest
    bucket; `_finish`. The smallest bucket's decode gets its rows split
    as `_start` splits the full batch's (what a regroup should hand on; each regroup's own output
    layout shows in its output bytes). Decode's model FLOPs are per chunk of compact_every steps."""
    import jax
    import jax.numpy as jnp

    from pacs_jax.sampler import compact

    chips, hbm = topology.chips, topology.hbm_bytes
    prompts, prompt_len = prompt_arrays[0].shape
    total = prompts * group_size
    shards = compact.row_shards()  # under the mesh, as at run time
    smallest = compact.bucket_rows(1, total, sampling.compact_buckets, shards)  # every bucket is a multiple of it
    largest = compact.largest_regroup(total, sampling, shards)  # = total when no regroup is allowed
    end = jax.ShapeDtypeStruct((), jnp.int32, sharding=key.sharding)  # the decode step a chunk stops at
    visible = prompt_len + sampling.max_new_tokens  # the last segment's window

    started = []
    report, compiled = compile_program("rollout _start", lambda: started.append(compact._start.lower(
        graphdef, policy_params, *prompt_arrays, params=sampling, group_size=group_size, unrolled=False)) or started[0],
        hbm, 2 * weights * prompts * prompt_len / chips)
    reports = [report]
    if compiled is None:
        return reports
    # The running batch and the output as _start hands them on: its shapes, XLA's shardings.
    _, loop, out = jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=s),
                                started[0].out_info, compiled.output_shardings)

    def decode(loop, rows):
        return compile_program(f"rollout _decode {rows} rows", lambda: compact._decode.lower(
            graphdef, policy_params, None, loop, key, end, None, params=sampling, visible=visible),
            hbm, 2 * weights * rows * sampling.compact_every / chips)[0]

    def regroup(rows):
        return compile_program(f"rollout _regroup {total}->{rows}",
                               lambda: compact._regroup.lower(loop, out, rows=rows, slots=0), hbm, 0.0)[0]

    def resized(a, axis):  # `smallest` rows along `axis`, split as the full batch is
        shape = (*a.shape[:axis], smallest, *a.shape[axis + 1 :])
        return jax.ShapeDtypeStruct(shape, a.dtype, sharding=a.sharding)

    reports.append(decode(loop, total))
    if largest < total:
        reports += [regroup(largest)] + ([regroup(smallest)] if smallest < largest else [])
        # Rows lead every array but the cache, [layers, rows, ...]; the step is a scalar.
        small = jax.tree.map(lambda a: resized(a, 0) if a.shape else a, loop._replace(cache=None))
        reports.append(decode(small._replace(cache=jax.tree.map(lambda a: resized(a, 1), loop.cache)), smallest))
    reports.append(compile_program("rollout _finish", lambda: compact._finish.lower(
        loop, out, *prompt_arrays, params=sampling, group_size=group_size), hbm, 0.0)[0])
    return reports

