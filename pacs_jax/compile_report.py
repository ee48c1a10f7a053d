"""What `python -m pacs_jax compile` reports per compiled program: XLA's per-chip memory (arguments,
outputs, donated buffers, temporaries, code) and FLOPs, the table it prints, and the advice when a
program does not fit.

Memory figures are XLA's per-chip numbers for the whole program: arguments (weights, optimizer
state, batch), outputs, temporaries (activations, KV cache, gradients) and the code. XLA counts
the body of a loop once in its FLOP figure (layers are a `lax.scan`, decoding a `while_loop`),
so the report adds an analytic matmul FLOP count (2 x weights x tokens per forward pass).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

from pacs_jax.tpu_topology import GIB

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


def report_from_compiled(name: str, compiled, hbm_bytes: int, model_flops: float, seconds: float) -> ProgramReport:
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


def compile_program(name: str, lowered_fn, hbm_bytes: int, model_flops: float):
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
    return report_from_compiled(name, compiled, hbm_bytes, model_flops, time.perf_counter() - start), compiled



def resident_report(name: str, tree, hbm_bytes: int) -> ProgramReport:
    """The bytes `tree` (ShapeDtypeStructs with shardings) puts on its fullest chip, as a report
    with no program: the weights going from the host straight into their shards (`load`)."""
    import jax

    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        for device, index in leaf.sharding.devices_indices_map(leaf.shape).items():
            elements = math.prod(len(range(*cut.indices(size))) for cut, size in zip(index, leaf.shape))
            per_device[device] = per_device.get(device, 0) + elements * leaf.dtype.itemsize
    peak = max(per_device.values())
    return ProgramReport(name=name, fits=peak <= hbm_bytes, output_bytes=peak, peak_bytes=peak)


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
        f"compute {m['compute_dtype']}, remat {m['remat']}, attention {m['attention']}; "
        f"{m['prompts_per_step']} prompts x {m['group_size']} responses, "
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
    if any(p.name in ("load", "init") for p in report.programs):
        lines.append("(load: the policy's shards, read by each host from the files, no program; init: the program "
                     "that makes the optimizer state (and PPO's critic) in their shards, the policy its argument)")
    top = compact_peak(report)
    if top is not None:
        need = f"{_gib(top.peak_bytes)} GiB per chip" if top.fits else "does not fit"
        lines.append(f"compact engine peak: {need}, set by {top.name[len('rollout '):]}"
                     + (" (a regroup holds the old batch's cache, an argument, and the new one's, an output)"
                        if "_regroup" in top.name else ""))
    return "\n".join(lines)


_ADVICE = {
    "load": "more mesh.fsdp or mesh.tensor (each chip holds its share of the weights) or a larger topology",
    "init": "more mesh.fsdp (shards the optimizer state and PPO's critic) or a larger topology",
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
