"""`python -m pacs_jax compile`: ahead-of-time compilation of the trainer's device programs for a
Cloud TPU slice, on a CPU.

`python -m pacs_jax compile --config CFG --topology v5p-64` builds the mesh over the devices of
a TPU topology description (libtpu from PyPI, no chip needed: tpu_topology.py), the policy and
train state as shapes only (no weights are ever materialised: compile_programs.py), and compiles
the three programs one RL step runs: the rollout (`sampler.static._generate`), the old-log-prob pass
(`update.make_prepare_fn`) and the update (`update.make_update_fn`). XLA's TPU compiler then says
how much HBM each program needs per chip, and refuses (RESOURCE_EXHAUSTED) a program that cannot
fit: that is the check. The report and its table: compile_report.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from pacs_jax.compile_programs import (
    PACK_MARGIN,
    PACK_PROMPT_TOKENS,
    PACK_SEED,
    PROGRAMS,
    compile_compact_rollout,
    compile_slots_rollout,
    decoder_config_for,
    matmul_weights,
    model_flops,
    packed_shape,
    rlvr_response_lengths,
    step_inputs,
)
from pacs_jax.compile_report import (
    CompileReport, compact_peak, compile_program, failure_message, format_report, resident_report,
)
from pacs_jax.config import Config, ConfigError
from pacs_jax.tpu_topology import TpuTopology, known_topologies, libtpu_problem, parse_topology, tpu_devices

# The names this command's callers (tests, scripts) have always used from here.
__all__ = [
    "PACK_MARGIN", "PACK_PROMPT_TOKENS", "PACK_SEED", "PROGRAMS", "CompileReport", "TpuTopology", "add_arguments",
    "compact_peak", "compile_for_topology", "decoder_config_for", "failure_message", "format_report",
    "known_topologies", "libtpu_problem", "packed_shape", "parse_topology", "rlvr_response_lengths", "run",
    "tpu_devices",
]


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

    from pacs_jax import sharding
    from pacs_jax.models import attention
    from pacs_jax.sampler.static import _generate
    from pacs_jax.update import jit_state_init, make_state_init, make_train_optimizer

    t, r = config.trainer, config.rollout
    decoder_config, hf = decoder_config_for(config, arch_file)
    devices = tpu_devices(topology)
    mesh = sharding.make_mesh(config.mesh, devices=devices)
    sharding.validate_mesh_for_model(
        mesh, decoder_config, t.prompts_per_step, r.group_size, mini_batches=t.mini_batches, micro_batches=t.micro_batches
    )
    step = step_inputs(config, decoder_config, hf, mesh)
    flops = model_flops(config, decoder_config, step, topology.chips)
    hbm = topology.hbm_bytes
    reports = []
    with jax.set_mesh(mesh):
        # Before the first step: the policy goes from the host into its shards (each host reads its
        # devices' blocks; no program runs), then the critic and optimizer state are made in theirs.
        if "load" in programs:
            reports.append(resident_report("load", step.policy_params, hbm))
        if "init" in programs:
            init = make_state_init(dict(step.graphdefs), make_train_optimizer(
                config.algorithm, config.optimizer, t.total_steps * t.mini_batches), config.algorithm.name == "ppo")
            report = compile_program("init", lambda: jit_state_init(init, step.policy_params, mesh).lower(
                step.policy_params), hbm, 0.0)[0]
            # XLA drops the policy from the arguments when only its shapes are read (Adam's zeros),
            # but it is on the chips meanwhile: counted as an argument.
            policy = resident_report("load", step.policy_params, hbm).peak_bytes
            if report.fits and report.argument_bytes < policy:
                report.peak_bytes += policy - report.argument_bytes
                report.argument_bytes, report.fits = policy, report.peak_bytes <= hbm
            reports.append(report)
        if "rollout" in programs and step.sampling.engine == "compact":
            reports += compile_compact_rollout(step.graphdefs["policy"], step.policy_params, step.prompt_arrays, step.key,
                                               step.sampling, r.group_size, topology, matmul_weights(decoder_config))
        elif "rollout" in programs and step.sampling.engine == "slots":
            reports += compile_slots_rollout(step.graphdefs["policy"], step.policy_params, step.prompt_arrays, step.key,
                                             step.sampling, r.group_size, topology, matmul_weights(decoder_config))
        elif "rollout" in programs:
            reports.append(compile_program("rollout", lambda: _generate.lower(
                step.graphdefs["policy"], step.policy_params, *step.prompt_arrays, step.key, params=step.sampling,
                group_size=r.group_size), hbm, flops["rollout"])[0])
        if "old_logprobs" in programs:
            reference = step.policy_params if step.needs_reference else None
            reports.append(compile_program("old_logprobs", lambda: step.prepare.lower(
                step.state.params, reference, step.rollout_arrays), hbm, flops["old_logprobs"])[0])
        if "update" in programs:
            reports.append(compile_program("update", lambda: step.update.lower(step.state, step.update_batch), hbm,
                                           flops["update"])[0])
    sampling, packed = step.sampling, step.packed
    model = {
        "layers": decoder_config.num_layers, "hidden_size": decoder_config.hidden_size,
        "vocab_size": decoder_config.vocab_size, "param_dtype": decoder_config.param_dtype,
        "compute_dtype": decoder_config.compute_dtype, "remat": decoder_config.remat,
        "attention": attention.resolve(decoder_config.attention, "tpu", decoder_config.compute_dtype),
        "prompts_per_step": t.prompts_per_step, "group_size": r.group_size, "prompt_tokens": step.prompt_len,
        "response_tokens": step.response_len, "mini_batches": t.mini_batches, "micro_batches": t.micro_batches,
        "old_logprob_chunks": step.prepare_chunks, "algorithm": config.algorithm.name, "rollout_engine": sampling.engine,
        "compact_every": sampling.compact_every, "compact_buckets": sampling.compact_buckets,
        "compact_max_keep": sampling.compact_max_keep, "slots": sampling.slots,
        "decode_segments": len(sampling.segment_ends()),  # the loops compiled, after min_segment_steps
        "shared_prompts": bool(step.shared and not packed),
    }
    if packed:
        model["packing"] = {**dataclasses.asdict(packed), "rows": packed.rows,
                            "assumed_prompt_tokens": min(PACK_PROMPT_TOKENS, step.prompt_len),
                            "assumed_responses": f"rlvr (bench/rollout_lengths.py), seed {PACK_SEED}", "margin": PACK_MARGIN}
    return CompileReport(
        topology=topology.name,
        libtpu_topology=topology.libtpu_name,
        chips=topology.chips,
        hosts=topology.hosts,
        hbm_bytes=hbm,
        mesh=dict(mesh.shape),
        model=model,
        programs=reports,
    )


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
