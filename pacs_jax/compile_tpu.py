"""Ahead-of-time compilation of the trainer's device programs for a Cloud TPU slice, on a CPU.

`python -m pacs_jax compile --config CFG --topology v5p-64` builds the mesh over the devices of
a TPU topology description (libtpu from PyPI, no chip needed), the policy and train state as
shapes only (no weights are ever materialised), and compiles the three programs one RL step
runs: the rollout (`rollout._generate`), the old-log-prob pass (`update.make_prepare_fn`) and
the update (`update.make_update_fn`). XLA's TPU compiler then says how much HBM each program
needs per chip, and refuses (RESOURCE_EXHAUSTED) a program that cannot fit: that is the check.

Memory figures are XLA's per-chip numbers for the whole program: arguments (weights, optimizer
state, batch), outputs, temporaries (activations, KV cache, gradients) and the code. XLA counts
the body of a loop once in its FLOP figure (layers are a `lax.scan`, decoding a `while_loop`),
so the report adds an analytic matmul FLOP count (2 x weights x tokens per forward pass).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from pacs_jax.config import Config, ConfigError

GIB = 1024**3

# Usable HBM per chip (GiB) as Cloud TPU documents it; the compiler's own limit is what decides.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}

# Slice shapes Cloud TPU offers. v4 and v5p product names count TensorCores (2 per chip, run as
# one "megacore" device), v5e and v6e names count chips.
_CUBE_SHAPES = {  # TensorCores -> chips x, y, z
    8: (2, 2, 1), 16: (2, 2, 2), 32: (2, 2, 4), 64: (2, 4, 4), 128: (4, 4, 4), 256: (4, 4, 8),
    512: (4, 8, 8), 1024: (8, 8, 8), 2048: (8, 8, 16), 4096: (8, 16, 16), 8192: (16, 16, 16),
}
_GRID_SHAPES = {  # chips -> chips x, y
    1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16),
}
# product-name prefix -> generation
_GENERATIONS = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    """One TPU slice as libtpu's topology description needs it."""

    name: str  # as the user wrote it, e.g. "v5p-64"
    generation: str  # v4 | v5p | v5e | v6e
    shape: tuple[int, ...]  # chips along each axis
    chips_per_host: tuple[int, int, int]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host)

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chip_config(self) -> str:
        # v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore").
        return "megacore" if self.generation in ("v4", "v5p") else "default"

    @property
    def hbm_bytes(self) -> int:
        return HBM_GIB[self.generation] * GIB


def known_topologies() -> list[str]:
    """Every product name `parse_topology` accepts (explicit forms like "v5e:2x2" also work)."""
    names = [f"{g}-{cores}" for g in ("v4", "v5p") for cores in _CUBE_SHAPES if not (g == "v4" and cores > 4096)]
    names += [f"{g}-{chips}" for g in ("v5e", "v5litepod", "v6e") for chips in _GRID_SHAPES]
    return names


def _chips_per_host(generation: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    chips = math.prod(shape)
    if generation in ("v5e", "v6e") and chips <= 8:
        return (*shape, 1) if len(shape) == 2 else shape  # one host holds the whole slice (1, 4 or 8 chips)
    return (2, 2, 1)  # multi-host slices: 4 chips per host on every generation


def parse_topology(name: str) -> TpuTopology:
    """"v5p-64", "v4-8", "v5e-16" / "v5litepod-16", "v6e-8", or libtpu's "v5e:2x2" / "v5p:2x4x4"."""
    text = name.strip().lower()
    explicit = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)", text)
    product = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    shape: Optional[tuple[int, ...]] = None
    generation = ""
    if explicit:
        generation = explicit.group(1)
        shape = tuple(int(n) for n in explicit.group(2).split("x"))
        allowed = _CUBE_SHAPES.values() if generation in ("v4", "v5p") else _GRID_SHAPES.values()
        if shape not in allowed:
            shape = None
    elif product:
        generation = _GENERATIONS[product.group(1)]
        count = int(product.group(2))
        shape = _CUBE_SHAPES.get(count) if generation in ("v4", "v5p") else _GRID_SHAPES.get(count)
    if shape is None:
        raise ConfigError(
            f"unknown TPU topology {name!r}. Known: {', '.join(known_topologies())}; or libtpu's form "
            f"GEN:SHAPE with a shape from those (e.g. v5e:2x2, v5p:2x4x4). v4/v5p names count "
            f"TensorCores (v5p-64 = 32 chips), v5e/v6e names count chips"
        )
    return TpuTopology(name, generation, shape, _chips_per_host(generation, shape))


def libtpu_problem() -> Optional[str]:
    """Why libtpu cannot compile here (not installed, or not the version this jax's [tpu] extra pins), or None."""
    import importlib.metadata as metadata

    fix = "pip install -e '.[tpu]' (jax's [tpu] extra installs the libtpu matching your jax)"
    if importlib.util.find_spec("libtpu") is None:
        return f"libtpu is not installed; {fix}"
    wanted = next((r for r in metadata.requires("jax") or [] if r.startswith("libtpu") and "tpu" in r.split(";", 1)[-1]), "")
    pin = re.match(r"libtpu\s*==\s*([\w.]+?)(\.\*)?\s*(;|$)", wanted)
    installed = metadata.version("libtpu")
    if pin and not (installed == pin.group(1) or (pin.group(2) and installed.startswith(pin.group(1) + "."))):
        return f"libtpu {installed} is installed but jax {metadata.version('jax')} needs {wanted.split(';')[0].strip()}; {fix}"
    return None


@contextlib.contextmanager
def _quiet_libtpu_probe():
    """Hold back what libtpu writes to stderr while it loads: off a TPU VM it always complains that
    it cannot find TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES, which compiling does not need (the
    topology is given). If loading fails, everything it wrote is passed on with the error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            sys.stderr.flush()
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tpu_devices(topology: TpuTopology) -> list:
    """The devices of `topology` (for compiling only), from libtpu's topology description."""
    problem = libtpu_problem()
    if problem:
        raise ConfigError(f"compiling for TPU needs libtpu: {problem}")
    # libtpu takes a machine-wide lock meant for processes that drive chips; this one only compiles,
    # so it must not collide with (or block) other JAX processes on the same machine.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    with _quiet_libtpu_probe():
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology.libtpu_name,
            chip_config_name=topology.chip_config,
            chips_per_host_bounds=topology.chips_per_host,
            num_slices=1,
            # Wrap-around links change collective routing, not memory; no wrap is valid for every size.
            wrap=(False, False, False),
        )
    devices = list(description.devices)
    if len(devices) != topology.chips:
        raise RuntimeError(f"libtpu describes {topology.libtpu_name} with {len(devices)} devices, expected {topology.chips} chips")
    return devices


# ------------------------------------------------------------------------------ reports


@dataclasses.dataclass
class ProgramReport:
    """One compiled program's per-chip HBM use (bytes) and work, or why it did not compile."""

    name: str
    fits: bool
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0  # outputs that reuse a donated argument's buffer
    temp_bytes: int = 0
    code_bytes: int = 0
    peak_bytes: int = 0  # arguments + outputs - aliased + temporaries + code
    xla_flops: float = 0.0  # XLA's count per chip, each loop body once
    model_flops: float = 0.0  # analytic matmul FLOPs per chip for the whole program
    compile_s: float = 0.0
    error: str = ""


@dataclasses.dataclass
class CompileReport:
    topology: str
    libtpu_topology: str
    chips: int
    hosts: int
    hbm_bytes: int
    mesh: dict
    model: dict
    programs: list

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.programs)

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "fits": self.fits}


def _report_from_compiled(name: str, compiled, hbm_bytes: int, model_flops: float, seconds: float) -> ProgramReport:
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict on older jax
    peak = (
        stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
        + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes
    )
    return ProgramReport(
        name=name,
        fits=peak <= hbm_bytes,
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        code_bytes=int(stats.generated_code_size_in_bytes),
        peak_bytes=int(peak),
        xla_flops=float((cost or {}).get("flops", 0.0)),
        model_flops=model_flops,
        compile_s=seconds,
    )


def _compile(name: str, lowered_fn, hbm_bytes: int, model_flops: float):
    """Lower and compile: (report, compiled program or None). An out-of-memory refusal from XLA
    becomes a report; anything else raises."""
    from pacs_jax import xla_options

    start = time.perf_counter()
    try:
        with xla_options.target("tpu"):  # the programs are lowered on a CPU host; no CPU options
            compiled = lowered_fn().compile()
    except Exception as error:  # noqa: BLE001 -- XLA raises JaxRuntimeError; only OOM is a result
        message = str(error)
        if "RESOURCE_EXHAUSTED" not in message:
            raise
        return ProgramReport(name=name, fits=False, model_flops=model_flops, compile_s=time.perf_counter() - start,
                             error=message.strip().splitlines()[0][:500]), None
    return _report_from_compiled(name, compiled, hbm_bytes, model_flops, time.perf_counter() - start), compiled


# ------------------------------------------------------------------------- the programs


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
                                   train_layers="scan" if m.train_layers == "auto" else m.train_layers)
    return config, hf


def _local_tokenizer(spec: str, chat_template: str):
    """The tokenizer `spec` names when it needs nothing from elsewhere ("char", or a folder or
    .model file on this machine), else None: compiling never downloads."""
    from pacs_jax.models.tokenizer import load_tokenizer

    if spec != "char" and not (spec and not spec.startswith("gs://") and Path(spec).expanduser().exists()):
        return None
    return load_tokenizer(spec, chat_template)


def _matmul_weights(decoder_config) -> int:
    """Weights a token's forward pass multiplies with (the LM head included, the embedding lookup not)."""
    c = decoder_config
    attention = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_layers * (attention + mlp) + c.hidden_size * c.vocab_size


def _abstract_train_state(decoder_config, config: Config):
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


def _placed(abstract, shardings):
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


PROGRAMS = ("rollout", "old_logprobs", "update")

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


def compile_for_topology(
    config: Config, topology: TpuTopology, arch_file: str = "", programs: Sequence[str] = PROGRAMS
) -> CompileReport:
    """Compile the rollout, old-log-prob and update programs of `config` (or those named in
    `programs`) for `topology`: the rollout as `rollout.engine` runs on TPU (`auto` = static),
    the other two on packed rows when `trainer.pack_row_tokens` is set."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise ConfigError(f"unknown program {unknown[0]!r}; choose from {list(PROGRAMS)}")
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from pacs_jax import sharding
    from pacs_jax.models.shared_prompt import shares_prompts
    from pacs_jax.packing import PACKED_KEYS
    from pacs_jax.rollout import SamplingParams, _generate, pick_bucket
    from pacs_jax.update import make_prepare_fn, make_update_fn

    t, r, a = config.trainer, config.rollout, config.algorithm
    decoder_config, hf = decoder_config_for(config, arch_file)
    devices = tpu_devices(topology)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    sharding.validate_mesh_for_model(
        mesh, decoder_config, t.prompts_per_step, r.group_size, mini_batches=t.mini_batches, micro_batches=t.micro_batches
    )
    graphdefs, optimizer, abstract_state = _abstract_train_state(decoder_config, config)
    state_sharding = sharding.train_state_shardings(abstract_state, mesh)
    state = _placed(abstract_state, state_sharding)
    policy_params = state.params["policy"]

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
    needs_reference = a.name == "grpo" and a.kl_coef > 0
    update_batch = {**rollout_arrays, "rewards": batch_array((rows,), jnp.float32),
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

    chips, weights = topology.chips, _matmul_weights(decoder_config)
    networks = 2 if a.name == "ppo" else 1  # PPO's critic is a second decoder
    # As the passes decide it per micro-batch (update.per_response_token).
    shared = t.shared_prompts and shares_prompts(rows // (t.mini_batches * t.micro_batches), r.group_size,
                                                 sharding.batch_size_divisor(mesh))
    if packed:
        forward_tokens = packed.rows * packed.row_tokens
    elif shared:
        forward_tokens = prompts * prompt_len + rows * response_len  # each group's prompt once
    else:
        forward_tokens = rows * (prompt_len + response_len)
    policy_forwards = 1 - t.micro_batches / prepare_chunks  # the first mini-batch's chunks are skipped
    backward_factor = 4 if decoder_config.remat != "none" else 3  # forward + backward (2x) + recompute
    reports = []
    with jax.set_mesh(mesh):
        if "rollout" in programs and sampling.engine == "compact":
            reports += _compile_compact_rollout(graphdefs["policy"], policy_params, prompt_arrays, key, sampling,
                                                r.group_size, topology, weights)
        elif "rollout" in programs:
            reports.append(_compile("rollout", lambda: _generate.lower(
                graphdefs["policy"], policy_params, *prompt_arrays, key, params=sampling, group_size=r.group_size),
                topology.hbm_bytes, 2 * weights * (prompts * prompt_len + rows * response_len) / chips)[0])
        if "old_logprobs" in programs:
            flops = 2 * weights * forward_tokens * (policy_forwards + networks - 1 + needs_reference) / chips
            reports.append(_compile("old_logprobs", lambda: prepare.lower(
                state.params, policy_params if needs_reference else None, rollout_arrays), topology.hbm_bytes, flops)[0])
        if "update" in programs:
            flops = 2 * weights * forward_tokens * backward_factor * networks / chips
            reports.append(_compile("update", lambda: update.lower(state, update_batch), topology.hbm_bytes, flops)[0])
    model = {
        "layers": decoder_config.num_layers, "hidden_size": decoder_config.hidden_size,
        "vocab_size": decoder_config.vocab_size, "param_dtype": decoder_config.param_dtype,
        "compute_dtype": decoder_config.compute_dtype, "remat": decoder_config.remat,
        "prompts_per_step": prompts, "group_size": r.group_size, "prompt_tokens": prompt_len,
        "response_tokens": response_len, "mini_batches": t.mini_batches, "micro_batches": t.micro_batches,
        "old_logprob_chunks": prepare_chunks, "algorithm": a.name, "rollout_engine": sampling.engine,
        "compact_every": sampling.compact_every, "compact_buckets": sampling.compact_buckets,
        "compact_max_keep": sampling.compact_max_keep,
        "decode_segments": len(sampling.segment_ends()),  # the loops compiled, after min_segment_steps
        "shared_prompts": bool(shared and not packed),
    }
    if packed:
        model["packing"] = {**dataclasses.asdict(packed), "rows": packed.rows, "assumed_prompt_tokens": min(PACK_PROMPT_TOKENS, prompt_len),
                            "assumed_responses": f"rlvr (bench/rollout_lengths.py), seed {PACK_SEED}", "margin": PACK_MARGIN}
    return CompileReport(
        topology=topology.name,
        libtpu_topology=topology.libtpu_name,
        chips=chips,
        hosts=topology.hosts,
        hbm_bytes=topology.hbm_bytes,
        mesh=dict(mesh.shape),
        model=model,
        programs=reports,
    )


def _compile_compact_rollout(graphdef, policy_params, prompt_arrays, key, sampling, group_size: int,
                             topology: TpuTopology, weights: int) -> list[ProgramReport]:
    """The compacting engine's programs (pacs_jax/compact.py), lowered with the shardings `_start`
    hands on (as at run time): `_start`; `_decode` at the full batch and at the smallest bucket, in
    the last segment (the widest attention window); `_regroup` from the full batch to the largest
    bucket rollout.compact_max_keep allows (its worst case: both batches' caches, the old one an
    argument, the new one an output; a later regroup starts from fewer rows) and to the smallest
    bucket; `_finish`. The smallest bucket's decode gets its rows split
    as `_start` splits the full batch's (what a regroup should hand on; each regroup's own output
    layout shows in its output bytes). Decode's model FLOPs are per chunk of compact_every steps."""
    import jax
    import jax.numpy as jnp

    from pacs_jax import compact

    chips, hbm = topology.chips, topology.hbm_bytes
    prompts, prompt_len = prompt_arrays[0].shape
    total = prompts * group_size
    shards = compact.row_shards(total)  # under the mesh, as at run time
    smallest = compact.bucket_rows(1, total, sampling.compact_buckets, shards)  # every bucket is a multiple of it
    largest = compact.largest_regroup(total, sampling, shards)  # = total when no regroup is allowed
    end = jax.ShapeDtypeStruct((), jnp.int32, sharding=key.sharding)  # the decode step a chunk stops at
    visible = prompt_len + sampling.max_new_tokens  # the last segment's window

    started = []
    report, compiled = _compile("rollout _start", lambda: started.append(compact._start.lower(
        graphdef, policy_params, *prompt_arrays, params=sampling, group_size=group_size, unrolled=False)) or started[0],
        hbm, 2 * weights * prompts * prompt_len / chips)
    reports = [report]
    if compiled is None:
        return reports
    # The running batch and the output as _start hands them on: its shapes, XLA's shardings.
    _, loop, out = jax.tree.map(lambda info, s: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=s),
                                started[0].out_info, compiled.output_shardings)

    def decode(loop, rows):
        return _compile(f"rollout _decode {rows} rows", lambda: compact._decode.lower(
            graphdef, policy_params, None, loop, key, end, None, params=sampling, visible=visible, total_rows=total),
            hbm, 2 * weights * rows * sampling.compact_every / chips)[0]

    def regroup(rows):
        return _compile(f"rollout _regroup {total}->{rows}", lambda: compact._regroup.lower(loop, out, rows=rows, slots=0),
                        hbm, 0.0)[0]

    def resized(a, axis):  # `smallest` rows along `axis`, split as the full batch is
        shape = (*a.shape[:axis], smallest, *a.shape[axis + 1 :])
        return jax.ShapeDtypeStruct(shape, a.dtype, sharding=a.sharding)

    reports.append(decode(loop, total))
    if largest < total:
        reports += [regroup(largest)] + ([regroup(smallest)] if smallest < largest else [])
        # Rows lead every array but the cache, [layers, rows, ...]; the step is a scalar.
        small = jax.tree.map(lambda a: resized(a, 0) if a.shape else a, loop._replace(cache=None))
        reports.append(decode(small._replace(cache=jax.tree.map(lambda a: resized(a, 1), loop.cache)), smallest))
    reports.append(_compile("rollout _finish", lambda: compact._finish.lower(
        loop, out, *prompt_arrays, params=sampling, group_size=group_size), hbm, 0.0)[0])
    return reports


def prepare_chunk_count(config: Config) -> int:
    """Chunks for the old-log-prob pass: as many rows per forward as one gradient micro-batch,
    so that whatever fits the update's activations fits this forward-only pass too."""
    return config.trainer.mini_batches * config.trainer.micro_batches


# ------------------------------------------------------------------------------ output


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def compact_peak(report: CompileReport) -> Optional[ProgramReport]:
    """The compacting engine's program with the highest per-chip peak (its rollout's peak), or None."""
    compact = [p for p in report.programs if p.name.startswith("rollout _")]
    return max(compact, key=lambda p: (not p.fits, p.peak_bytes)) if compact else None


def format_report(report: CompileReport) -> str:
    hbm = report.hbm_bytes
    mesh = " x ".join(f"{axis} {size}" for axis, size in report.mesh.items())
    m = report.model
    lines = [
        f"{report.topology} ({report.libtpu_topology}): {report.chips} chips on {report.hosts} host(s), "
        f"{_gib(hbm)} GiB HBM per chip; mesh {mesh}",
        f"model: {m['layers']} layers, hidden {m['hidden_size']}, vocab {m['vocab_size']}, params {m['param_dtype']}, "
        f"compute {m['compute_dtype']}, remat {m['remat']}; {m['prompts_per_step']} prompts x {m['group_size']} responses, "
        f"{m['prompt_tokens']} + {m['response_tokens']} tokens, {m['mini_batches']} mini x {m['micro_batches']} micro-batches",
    ]
    if any(p.name.startswith("rollout") for p in report.programs):
        lines.append(f"rollout engine: {m['rollout_engine']}" + (
            f" (every {m['compact_every']} steps, {m['compact_buckets']} buckets, a regroup keeps at most "
            f"{m['compact_max_keep']:g} of the running rows; decode shown in the last of "
            f"{m['decode_segments']} segments, model TFLOP per {m['compact_every']}-step chunk)"
            if m["rollout_engine"] == "compact" else ""))
    pack = m.get("packing")
    if pack:
        lines.append(
            f"packed old log-probs and update: {pack['micro_batches']} micro-batches x {pack['rows_per_micro']} rows of "
            f"{pack['row_tokens']} tokens (padded: x {pack['sequences_per_micro']} rows of "
            f"{m['prompt_tokens'] + m['response_tokens']}), assuming {pack['assumed_prompt_tokens']}-token prompts and "
            f"rlvr responses (bench/rollout_lengths.py: log-normal, mean a quarter of the cap, 3% at the cap; this draw's "
            f"mean {pack['mean_response_tokens']:.0f}): {pack['mean_rows']:.1f} rows per micro-batch on average, "
            f"{pack['fullest_rows']} for the fullest, + {pack['margin']:.0%} margin, up to the trainer's ladder"
        )
    lines += [
        "",
        f"{'program':<31}{'args GiB':>10}{'temp GiB':>10}{'out GiB':>10}{'peak GiB':>10}{'of HBM':>8}"
        f"{'model TFLOP':>13}{'XLA TFLOP':>11}{'compile s':>11}",
    ]
    for p in report.programs:
        if p.error:
            lines.append(f"{p.name:<31}{'does not fit: ' + p.error}")
            continue
        lines.append(
            f"{p.name:<31}{_gib(p.argument_bytes):>10}{_gib(p.temp_bytes):>10}{_gib(p.output_bytes):>10}"
            f"{_gib(p.peak_bytes):>10}{p.peak_bytes / hbm:>8.0%}{p.model_flops / 1e12:>13.1f}{p.xla_flops / 1e12:>11.2f}"
            f"{p.compile_s:>11.1f}"
        )
    lines.append("(per chip; peak = args + out - donated + temp + code; XLA counts each loop body once, "
                 "model TFLOP = 2 x weights x tokens per forward pass)")
    top = compact_peak(report)
    if top is not None:
        need = f"{_gib(top.peak_bytes)} GiB per chip" if top.fits else "does not fit"
        lines.append(f"compact engine peak: {need}, set by {top.name[len('rollout '):]}"
                     + (" (a regroup holds the old batch's cache, an argument, and the new one's, an output)"
                        if "_regroup" in top.name else ""))
    return "\n".join(lines)


_ADVICE = {
    "rollout": "the KV cache grows with trainer.prompts_per_step x rollout.group_size x (prompt + "
               "rollout.max_new_tokens) and is split over mesh.data x mesh.fsdp: use a larger topology, fewer "
               "prompts per step, or shorter responses; with rollout.engine=compact, a smaller "
               "rollout.compact_max_keep (a regroup holds the running batch's cache and the new one's at once, "
               "each chip its own share of the rows: at most 1 + compact_max_keep times the running cache) or "
               "rollout.engine=static",
    "old_logprobs": "more trainer.micro_batches (smaller forward chunks) or model.remat=full",
    "update": "more trainer.micro_batches (fewer responses per gradient micro-batch), model.remat=full, "
              "more mesh.fsdp (shards weights and optimizer state) or a larger topology",
}


def failure_message(report: CompileReport) -> str:
    lines = [f"does not fit in the {_gib(report.hbm_bytes)} GiB of HBM per chip of {report.topology}:"]
    for p in report.programs:
        if p.fits:
            continue
        need = f"needs {_gib(p.peak_bytes)} GiB per chip" if not p.error else p.error
        lines.append(f"  {p.name}: {need}; try {_ADVICE[p.name.split()[0]]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v5p-64, v4-8, v5e-4 / v5litepod-4, v6e-8, v5e:2x2")
    parser.add_argument("--arch", default="", help="config.json-style architecture file used instead of model.path "
                        "(no weights needed), e.g. configs/arch/qwen2.5-7b.json")
    parser.add_argument("--out", default="", help="also write the report as JSON here")
    parser.add_argument("--programs", default=",".join(PROGRAMS), help=f"comma-separated subset of {','.join(PROGRAMS)}")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. trainer.micro_batches=16")


def run(args: argparse.Namespace) -> int:
    """0: every program fits; 1: one does not (the message says what to change)."""
    import jax

    from pacs_jax.config import load_config

    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")  # compiling needs no accelerator attached

    topology = parse_topology(args.topology)  # a bad name fails before anything is loaded
    config = load_config(args.config, args.overrides)
    report = compile_for_topology(config, topology, args.arch, [p.strip() for p in args.programs.split(",") if p.strip()])
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report.to_json(), indent=2))
    if not report.fits:
        print(failure_message(report), file=sys.stderr)
        return 1
    print(f"fits: every program compiles for {report.topology} within its HBM")
    return 0
