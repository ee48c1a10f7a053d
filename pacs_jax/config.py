"""Typed run configuration: dataclasses, YAML + dotted command-line overrides, validation.

Every check that can be made without touching a device happens in `validate`, so a bad
config fails in a second with the field's name instead of after a compile.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and how to fix it."""


@dataclass
class ModelConfig:
    # HF folder (config.json + safetensors). Empty: a randomly initialised model from `arch`.
    path: str = ""
    # Architecture for random init, as HF config.json keys (used when `path` is empty).
    arch: dict = field(default_factory=dict)
    # Tokenizer: "" = the model folder; a folder, a sentencepiece .model file, or "char"
    # (the built-in character tokenizer for the synthetic tasks).
    tokenizer: str = ""
    # Chat template (Jinja) for tokenizers that do not ship one (sentencepiece, char).
    chat_template: str = ""
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    # How the update and old-log-prob passes run the layers: "scan" (compile time independent of
    # depth), "unrolled" (a Python loop: bench.step's update 1.1x faster on XLA CPU, compile time
    # grows with depth), "auto" = unrolled on CPU, scanned on TPU / GPU.
    train_layers: Literal["auto", "scan", "unrolled"] = "auto"
    # Attention over whole sequences (the update, the old-log-prob pass, an empty-cache prefill;
    # pacs_jax/models/attention.py): "dense" (T x T scores), "blockwise" (online softmax over blocks
    # of attention_block tokens, memory linear in the length, any backend), "splash" (the Pallas TPU
    # kernel), "cudnn" (cuDNN flash attention, GPU, bfloat16); "auto" = splash on TPU, cudnn on GPU
    # in bfloat16 (else blockwise), dense on CPU.
    attention: Literal["auto", "dense", "blockwise", "splash", "cudnn"] = "auto"
    attention_block: int = 512  # tokens per block (splash rounds it up to a multiple of 128)


@dataclass
class DataConfig:
    # A .jsonl / .json / .parquet file, a Hugging Face dataset name, or "synthetic:arithmetic"
    # / "synthetic:countdown".
    train: str = "synthetic:arithmetic"
    # Validation sets: name -> source (same forms as `train`). Empty: no validation.
    val: dict = field(default_factory=dict)
    # Row format: auto | deepscaler | gsm8k | math500 | aime | amc | beyondaime | custom (uses the fields below).
    format: str = "auto"
    problem_field: str = "problem"
    answer_field: str = "answer"
    split: str = "train"  # for Hugging Face datasets
    # "chat": problem + instruction as one user turn of the chat template. Otherwise a raw
    # Python format string with {problem} (for base models).
    prompt_template: str = "chat"
    instruction: str = " Please reason step by step, and put your final answer within \\boxed{}."
    # With prompt_template "chat": a system message before the user turn ("" = none; paper v2: "You are a
    # helpful assistant."), and extra variables for the chat template, as transformers'
    # apply_chat_template(**kwargs), e.g. {enable_thinking: false} for Qwen3's non-thinking mode.
    system_prompt: str = ""
    chat_template_kwargs: dict = field(default_factory=dict)
    max_prompt_tokens: int = 512
    overlong_prompts: Literal["filter", "error"] = "filter"
    malformed_rows: Literal["skip", "error"] = "error"
    shuffle: bool = True
    # Synthetic task options (ignored for files).
    synthetic_size: int = 2000
    synthetic_difficulty: int = 1
    synthetic_seed: int = 0


@dataclass
class RolloutConfig:
    group_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    # Decode in this many segments, each attending only to the cache slots written by its end
    # (1 = every step reads the whole cache; more segments = less attention traffic, longer compile),
    # fewer where a segment would be shorter than 64 steps (SamplingParams.min_segment_steps).
    decode_segments: int = 4
    # How decode runs the layers: "scan" over the stacked weights, "unrolled" over per-layer copies
    # (faster on XLA CPU; doubles the weights' memory while sampling), "auto" = unrolled on CPU only.
    decode_layers: Literal["auto", "scan", "unrolled"] = "auto"
    # Prefill in chunks of this many prompt tokens, skipping leading chunks that are padding in
    # every row (0 = one pass over the bucket; used too when a bucket is not a multiple of it).
    prefill_chunk: int = 64
    # Prompt lengths are padded up to the smallest bucket that fits (no recompiles).
    prompt_buckets: list = field(default_factory=lambda: [64, 128, 256, 512])
    # The decode engine. "static": every row is decoded until the longest response stops.
    # "compact": every compact_every steps the unfinished rows are gathered into a smaller batch
    # (a multiple of ceil(rows / compact_buckets) rows), so decode cost follows the tokens actually
    # generated (pacs_jax/sampler/compact.py; bench/rollout_lengths.py). Both sample the same tokens for a key.
    # "auto": compact on CPU (measured faster), static on TPU / GPU (`compile` checks compact's
    # memory there, but no run there has measured its speed yet).
    # "slots": `slots` responses decode at once, each slot refilled with the next waiting
    # (prompt, sample) as its response stops (pacs_jax/sampler/slots.py): the KV cache is
    # slots x (prompt + max_new_tokens) whatever the batch (plus each prompt's cache once).
    engine: Literal["auto", "static", "compact", "slots"] = "auto"
    # With engine=slots: the number of decode slots, a multiple of mesh.data x mesh.fsdp.
    slots: int = 0
    compact_every: int = 32
    compact_buckets: int = 16
    # A compaction happens only when the new batch keeps at most this fraction of the running
    # batch's rows, in (0, 1]; otherwise decode goes on at the current size. A regroup holds the
    # old and the new KV cache at once, so its peak is at most (1 + this) x the running cache
    # (1.0 = compact whenever the rows fit a smaller bucket: up to 1.94x with 16 buckets).
    # 0.4 (6 of 16 buckets from the full batch): the paper 7B config on v5p-64 has 63.65 GiB of
    # cache per chip of 95 GiB; compiled (docs/cloud_tpu.md), its worst regroup peaks at 89.06 GiB
    # at 0.4, 93.09 GiB (98%, too tight) at 0.45, and does not fit at 0.5 or 1.0. Simulated on
    # rlvr lengths (8192 rows x 4096, bench/RESULTS.md): 2.63x fewer decode row-steps than the
    # static loop, against 3.76x at 1.0.
    compact_max_keep: float = 0.4

    def engine_options(self) -> dict:
        """The SamplingParams settings that change how the sampler runs, not what it samples."""
        return dict(decode_segments=self.decode_segments, decode_layers=self.decode_layers, prefill_chunk=self.prefill_chunk,
                    engine=self.engine, compact_every=self.compact_every, compact_buckets=self.compact_buckets,
                    compact_max_keep=self.compact_max_keep, slots=self.slots)


# reward.verifier names -> "module:function". "math": the last \boxed{} only (ours);
# "math_authors": an answer anywhere in the response, the PACS authors' reward, which the
# paper's numbers were trained with. See pacs_jax/rewards/math.py. "number" / "number_authors":
# the same extraction, but only an integer literal equal to the truth counts: for the synthetic
# arithmetic tasks, whose problem is an expression that math-verify would accept as the answer.
NAMED_VERIFIERS = {
    "math": "pacs_jax.rewards.math:score",
    "math_authors": "pacs_jax.rewards.math:score_authors",
    "number": "pacs_jax.rewards.synthetic:number_score",
    "number_authors": "pacs_jax.rewards.synthetic:number_score_authors",
}


@dataclass
class RewardConfig:
    # A name in NAMED_VERIFIERS or "module:function" taking (response, ground_truth).
    verifier: str = "math"
    workers: int = 2
    timeout_s: float = 5.0
    batch_deadline_s: float = 300.0
    memory_limit_mb: int = 4096  # per verifier worker (address space); 0 = no limit
    # DAPO's soft overlong punishment (pacs_jax/algorithms/overlong.py): a response longer than
    # rollout.max_new_tokens - overlong_buffer tokens loses reward linearly, down to
    # -overlong_penalty at max_new_tokens. 0 = off. Not for PACS (its rewards are 0/1 labels).
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0


@dataclass
class AlgorithmConfig:
    name: Literal["pacs", "grpo", "gspo", "ppo", "rloo"] = "pacs"
    # PACS
    beta: float = 1.0
    reward_method: Literal["1", "2"] = "1"
    adv_estimator: Literal["rloo", "grpo", "naive"] = "rloo"
    norm_adv_by_std: bool = True
    weight_mode: Optional[Literal["question", "only_positive", "only_negative"]] = "question"
    # The policy the PACS score compares against (reward_method "1"): "old" = pi_old, the policy that
    # sampled the batch (the authors' code and paper v1: the score is 0 on the first mini-batch);
    # "reference" = a reference policy pi_ref (paper v2, Eq. 7), the post-warm-up policy until a reset.
    score_reference: Literal["old", "reference"] = "old"
    # Paper v2 / ProRL: every N RL steps the reference becomes the current policy and the optimizer's
    # state (Adam moments and their count) starts afresh; the learning-rate schedule goes on. 0 = never.
    # Needs a reference: score_reference=reference (PACS) or kl_coef > 0 (GRPO's KL term).
    reference_reset_every: int = 0
    # GRPO / GSPO / PPO (GSPO's paper: 3e-4 / 4e-4, its ratio is a per-token geometric mean)
    clip_low: float = 0.2
    clip_high: float = 0.2
    # Dual-clip PPO (verl's actor.clip_ratio_c): where A < 0 the per-token loss is at most -A * clip_ratio_c.
    clip_ratio_c: float = 3.0
    kl_coef: float = 0.0
    loss_agg_mode: Literal[
        "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    ] = "token-mean"
    # seq-mean-token-sum-norm divides each response's token sum by this (0 = the padded response
    # length). verl's loss in this mode is ours with max_new_tokens / (its per-GPU micro-batch size).
    seq_norm_divisor: float = 0.0
    # DAPO's overlong filter: responses that reached rollout.max_new_tokens without a stop token
    # are left out of the loss (they still count in their group's advantages / baselines).
    overlong_filter: bool = False
    # Sampler/trainer mismatch correction (every algorithm; pacs_jax/algorithms/rollout_correction.py):
    # importance weights rho = pi_old / pi_sampler per token ("token") or per response ("sequence",
    # the product over its tokens). "tis": min(rho, cap) multiplies the loss; "mis": tokens or
    # responses with rho outside [1 / cap, cap] leave the loss. "none": only logged (rollout_corr/k3_kl).
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    rollout_correction_cap: float = 2.0
    rollout_correction_level: Literal["token", "sequence"] = "token"
    # PPO critic
    gamma: float = 1.0
    lam: float = 1.0
    value_clip: float = 0.5
    critic_lr: float = 1e-5
    value_coef: float = 1.0


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 = off
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0


@dataclass
class MeshConfig:
    data: int = -1  # -1 fills the remaining devices
    fsdp: int = 1
    tensor: int = 1


@dataclass
class SFTConfig:
    # Supervised warm-up on the training task's reference answers before RL (0 = none).
    steps: int = 0
    lr: float = 1e-3
    batch_size: int = 64


@dataclass
class EvalConfig:
    # Sampling for evaluation (the authors: 0.6 / 0.95 / 4096), and for validation during training
    # with trainer.val_sampling=eval; greedy validation uses only max_new_tokens, prompts_per_batch
    # and max_problems from here.
    n_samples: int = 4
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 4096
    prompts_per_batch: int = 64
    max_problems: int = 0  # 0 = every problem of each set


@dataclass
class TrainerConfig:
    run_dir: str = "runs/default"
    total_steps: int = 300
    seed: int = 0
    prompts_per_step: int = 1024
    # Optimizer steps per rollout batch (the paper: 4) and gradient-accumulation micro-batches
    # per optimizer step. Both count prompts (whole groups), never single responses.
    mini_batches: int = 4
    micro_batches: int = 1
    # Packed update and old-log-prob passes: the token budget of a packed row, which holds several
    # (prompt + response) sequences back to back, each attending only to itself (0 = off: every row
    # is the prompt bucket + rollout.max_new_tokens long, mostly padding for short responses). At
    # least the longest possible sequence, max(rollout.prompt_buckets) + rollout.max_new_tokens.
    # Rows per micro-batch follow the real lengths (first-fit-decreasing, eighths of one
    # sequence per row): at most 8 compiled shapes. See pacs_jax/packing.py.
    pack_row_tokens: int = 0
    # Unpacked update and old-log-prob passes run each group's prompt once, as one row of the prompt
    # and its group_size responses (pacs_jax/models/shared_prompt.py), instead of once per response:
    # the same numbers, group_size - 1 fewer copies of every prompt position (bench.step: 29% fewer
    # positions, the update 1.25x faster). Used where a micro-batch's prompts divide over
    # mesh.data * mesh.fsdp (else per-response rows); ignored with pack_row_tokens (packed rows are
    # per sequence).
    shared_prompts: bool = True
    # DAPO's dynamic sampling (pacs_jax/dynamic_sampling.py): groups whose rewards are all equal are
    # dropped and more prompts sampled, in rounds of prompts_per_step (one compiled shape), until
    # the batch is full, at most dynamic_sampling_max_rounds rounds (then all-equal groups fill the
    # rest and the log says so). For every algorithm; PACS learns from all-equal groups too (each
    # response's label is its reward), so its configs leave it off.
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 8
    # How the engines' programs compile on CPU (pacs_jax/xla_options.py): "fast" = LLVM level 1,
    # and XLA's elemental kernel emitters for the programs without a backward pass: about a third
    # less compile time (a short run's first step is mostly compile) for steps within noise;
    # "full" = XLA's defaults. TPU/GPU programs always get XLA's defaults.
    cpu_compile: Literal["fast", "full"] = "fast"
    # JAX's persistent compilation cache (pacs_jax/xla_options.py): programs that took 0.2 s or
    # more to compile (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS overrides) are written here and
    # read back by later runs of the same shapes and options (a rerun, a resume on the same
    # machine, a sweep's later points), whose first steps then skip those compiles (the debug run:
    # first step 6 -> 2 s). "" = off. A gs:// path outlives a spot VM. The cache is trusted code:
    # keep it where only you can write.
    compile_cache: str = "~/.cache/pacs_jax/xla"
    save_every: int = 50
    keep_last: int = 3
    keep_every: int = 0  # also keep every K-th step's checkpoint (0 = off)
    # "auto": continue from the newest checkpoint that restores. "never": start over; an earlier
    # run's checkpoints and logs in these directories are moved into folders named replaced-<time>.
    resume: Literal["auto", "never"] = "auto"
    eval_every: int = 0  # 0 = no periodic validation on data.val
    # Also validate the starting policy (after the SFT warm-up) before the first RL step, logged
    # as step 0 (the authors' val_before_train). Needs data.val.
    val_before_train: bool = False
    # How validation samples: "greedy" (temperature 0, one response per problem: the authors'
    # in-training validation) or "eval" (the eval section's sampling, eval.n_samples each, pass@k).
    val_sampling: Literal["greedy", "eval"] = "greedy"
    # Every N-th step, write that step's training generations to run_dir/rollouts/train_<step>.jsonl;
    # each validation then writes its own to rollouts/val_<step>.jsonl (0 = off).
    dump_rollouts_every: int = 0
    # Where checkpoints go: "" = run_dir/checkpoints. May be gs://bucket/... (Orbax writes there).
    checkpoint_dir: str = ""
    export_hf: str = ""  # export the final policy to this HF folder
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "pacs_jax"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ---------------------------------------------------------------------------- parsing


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` coerced to `hint`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "5e-4" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if hint in (dict, list) or origin in (dict, list):
        base = origin or hint
        if isinstance(value, base):
            return value
        raise ConfigError(f"{key}: expected a {base.__name__}, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def _from_dict(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; allowed keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML (optional), apply `key.sub=value` overrides (values parsed as YAML), validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists() or path.is_dir():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. a template like "{problem}="): take the text as it is
        _set_dotted(tree, key.strip(), value)
    config = _from_dict(Config, tree)
    validate(config)
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


# ---------------------------------------------------------------------------- validation


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate_rlvr_options(config: Config) -> None:
    """GSPO, the rollout correction and DAPO's overlong shaping."""
    a, reward, r = config.algorithm, config.reward, config.rollout
    if a.name == "gspo":
        _require(
            a.loss_agg_mode == "seq-mean-token-mean",
            f"algorithm.name=gspo needs algorithm.loss_agg_mode=seq-mean-token-mean (GSPO's objective is a mean "
            f"over responses of one sequence-level term each, as verl's gspo loss), got {a.loss_agg_mode!r}",
        )
        _require(
            a.kl_coef == 0,
            f"algorithm.kl_coef={a.kl_coef} is not supported with algorithm.name=gspo (GSPO trains without a KL "
            f"term); set algorithm.kl_coef=0",
        )
    _require(
        a.rollout_correction_cap > 1,
        f"algorithm.rollout_correction_cap must be > 1 (importance weights above it are capped (tis) or masked "
        f"(mis); verl's default is 2.0), got {a.rollout_correction_cap}",
    )
    _require(
        reward.overlong_buffer >= 0,
        f"reward.overlong_buffer must be >= 0 (tokens before rollout.max_new_tokens where the overlong penalty "
        f"starts; 0 = off), got {reward.overlong_buffer}",
    )
    _require(
        reward.overlong_buffer < r.max_new_tokens,
        f"reward.overlong_buffer={reward.overlong_buffer} must be less than rollout.max_new_tokens="
        f"{r.max_new_tokens} (the penalty starts at max_new_tokens - overlong_buffer tokens)",
    )
    _require(
        reward.overlong_penalty >= 0,
        f"reward.overlong_penalty must be >= 0 (the reward taken away at rollout.max_new_tokens), got {reward.overlong_penalty}",
    )
    _require(
        not (reward.overlong_buffer > 0 and a.name == "pacs"),
        "reward.overlong_buffer > 0 shapes the reward, but PACS trains on 0/1 correctness labels; "
        "set reward.overlong_buffer=0 and use algorithm.overlong_filter=true to leave truncated responses out of the loss",
    )


def _validate_reference(a: AlgorithmConfig) -> None:
    """The v2 score's reference policy and its resets (pacs_jax/policy.py)."""
    _require(
        a.score_reference == "old" or a.name == "pacs",
        f"algorithm.score_reference={a.score_reference!r} is a PACS option (the policy its score compares "
        f"against); with algorithm.name={a.name} set algorithm.score_reference=old",
    )
    _require(
        a.score_reference == "old" or a.reward_method == "1",
        "algorithm.score_reference=reference needs algorithm.reward_method=\"1\" (the log-ratio score); "
        "reward_method \"2\" scores log pi_theta alone and compares against no policy",
    )
    _require(
        a.reference_reset_every >= 0,
        f"algorithm.reference_reset_every must be >= 0 (RL steps between reference resets; 0 = never), "
        f"got {a.reference_reset_every}",
    )
    has_reference = (a.name == "pacs" and a.score_reference == "reference") or (a.name == "grpo" and a.kl_coef > 0)
    _require(
        a.reference_reset_every == 0 or has_reference,
        f"algorithm.reference_reset_every={a.reference_reset_every} resets a reference policy, which "
        f"algorithm.name={a.name} does not have here: set algorithm.score_reference=reference (PACS, paper v2) "
        f"or algorithm.kl_coef > 0 (GRPO), or algorithm.reference_reset_every=0",
    )


def validate(config: Config) -> None:
    """Checks that need no device and no files beyond the config itself."""
    t, r, a, o = config.trainer, config.rollout, config.algorithm, config.optimizer
    _require(config.model.attention_block >= 1,
             f"model.attention_block must be a positive number of tokens (e.g. 512), got {config.model.attention_block}")
    _require(r.group_size >= 1, f"rollout.group_size must be >= 1, got {r.group_size}")
    _require(r.max_new_tokens > 0, f"rollout.max_new_tokens must be > 0, got {r.max_new_tokens}")
    _require(r.temperature >= 0, f"rollout.temperature must be >= 0 (0 = greedy), got {r.temperature}")
    _require(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    _require(r.top_k >= 0, f"rollout.top_k must be >= 0 (0 = off), got {r.top_k}")
    _require(r.decode_segments >= 1, f"rollout.decode_segments must be >= 1 (1 = one decode loop), got {r.decode_segments}")
    _require(r.prefill_chunk >= 0, f"rollout.prefill_chunk must be >= 0 (0 = one pass over the prompt), got {r.prefill_chunk}")
    _require(r.engine in ("auto", "static", "compact", "slots"),
             f"rollout.engine must be 'auto', 'static', 'compact' or 'slots', got {r.engine!r}")
    _require(isinstance(r.slots, int) and r.slots >= (1 if r.engine == "slots" else 0),
             f"rollout.slots must be >= 1 with rollout.engine=slots (responses decoded at once), got {r.slots!r}")
    row_ways = config.mesh.data * config.mesh.fsdp
    _require(r.engine != "slots" or row_ways < 1 or r.slots % row_ways == 0,  # -1 (fill): checked when the mesh is built
             f"rollout.slots={r.slots} must be a multiple of mesh.data x mesh.fsdp = {row_ways} (the slots split over them)")
    _require(r.compact_every >= 1, f"rollout.compact_every must be >= 1 (decode steps between compactions), got {r.compact_every}")
    _require(r.compact_buckets >= 1, f"rollout.compact_buckets must be >= 1 (1 = never compact), got {r.compact_buckets}")
    _require(isinstance(r.compact_max_keep, (int, float)) and 0 < r.compact_max_keep <= 1,
             f"rollout.compact_max_keep must be in (0, 1] (the most a compaction keeps of the running rows; "
             f"1.0 = any smaller bucket), got {r.compact_max_keep!r}")
    _require(
        bool(r.prompt_buckets) and all(isinstance(b, int) and b > 0 for b in r.prompt_buckets),
        f"rollout.prompt_buckets must be a non-empty list of positive integers, got {r.prompt_buckets}",
    )
    _require(t.prompts_per_step >= 1, f"trainer.prompts_per_step must be >= 1, got {t.prompts_per_step}")
    _require(t.mini_batches >= 1, f"trainer.mini_batches must be >= 1, got {t.mini_batches}")
    _require(t.micro_batches >= 1, f"trainer.micro_batches must be >= 1, got {t.micro_batches}")
    micro_total = t.mini_batches * t.micro_batches
    _require(
        t.prompts_per_step >= micro_total,
        f"trainer.prompts_per_step={t.prompts_per_step} leaves a micro-batch without a whole group: "
        f"trainer.mini_batches x trainer.micro_batches = {micro_total} micro-batches each need at least "
        f"one prompt's {r.group_size} responses; the smallest valid trainer.prompts_per_step is {micro_total}",
    )
    _require(t.pack_row_tokens >= 0, f"trainer.pack_row_tokens must be >= 0 (0 = no packing), got {t.pack_row_tokens}")
    longest = max(r.prompt_buckets) + r.max_new_tokens  # every sequence must fit one packed row
    _require(
        t.pack_row_tokens == 0 or t.pack_row_tokens >= longest,
        f"trainer.pack_row_tokens={t.pack_row_tokens} is shorter than the longest possible sequence "
        f"(largest rollout.prompt_buckets + rollout.max_new_tokens); the smallest valid value is {longest} (0 = no packing)",
    )
    _require(
        t.prompts_per_step % t.mini_batches == 0,
        f"trainer.mini_batches={t.mini_batches} must divide trainer.prompts_per_step="
        f"{t.prompts_per_step} (mini-batches hold whole groups)",
    )
    per_mini = t.prompts_per_step // t.mini_batches
    _require(
        per_mini % t.micro_batches == 0,
        f"trainer.micro_batches={t.micro_batches} must divide the {per_mini} prompts of each "
        f"mini-batch (prompts_per_step / mini_batches)",
    )
    _require(t.total_steps >= 0, f"trainer.total_steps must be >= 0, got {t.total_steps}")
    _require(
        t.dynamic_sampling_max_rounds >= 1,
        f"trainer.dynamic_sampling_max_rounds must be >= 1 (rounds of prompts_per_step prompts per step), "
        f"got {t.dynamic_sampling_max_rounds}",
    )
    _require(
        not t.dynamic_sampling or r.group_size >= 2,
        f"trainer.dynamic_sampling drops groups whose rewards are all equal, which needs rollout.group_size >= 2, "
        f"got {r.group_size}",
    )
    _require(t.save_every >= 0 and t.keep_last >= 1, "trainer.save_every must be >= 0 and trainer.keep_last >= 1")
    needs_group = a.name in ("pacs", "rloo", "grpo", "gspo")
    if a.name == "rloo" or (a.name == "pacs" and a.adv_estimator == "rloo"):
        _require(
            r.group_size >= 2,
            f"rollout.group_size must be >= 2 for the rloo baseline (leave-one-out over the group), "
            f"got {r.group_size}; use algorithm.adv_estimator=naive for single responses",
        )
    elif needs_group and a.name in ("grpo", "gspo") or (a.name == "pacs" and a.adv_estimator == "grpo"):
        _require(
            r.group_size >= 2,
            f"rollout.group_size must be >= 2 for group-normalised advantages, got {r.group_size}",
        )
    _require(a.beta > 0, f"algorithm.beta must be > 0, got {a.beta}")
    _require(0 <= a.clip_low < 1 and a.clip_high >= 0, "algorithm.clip_low must be in [0, 1) and clip_high >= 0")
    _require(
        a.clip_ratio_c > 1,
        f"algorithm.clip_ratio_c must be > 1 (the dual clip bounds the ratio on negative advantages), "
        f"got {a.clip_ratio_c}; use .inf to turn the dual clip off",
    )
    _require(a.kl_coef >= 0, f"algorithm.kl_coef must be >= 0, got {a.kl_coef}")
    _validate_reference(a)
    _require(
        a.seq_norm_divisor >= 0,
        f"algorithm.seq_norm_divisor must be >= 0 (0 = the padded response length), got {a.seq_norm_divisor}",
    )
    _require(0 <= a.gamma <= 1 and 0 <= a.lam <= 1, "algorithm.gamma and algorithm.lam must be in [0, 1]")
    _validate_rlvr_options(config)
    _require(o.lr >= 0, f"optimizer.lr must be >= 0, got {o.lr}")
    _require(o.grad_clip >= 0, f"optimizer.grad_clip must be >= 0 (0 = off), got {o.grad_clip}")
    _require(o.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}")
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(config.mesh, axis)
        _require(size == -1 or size >= 1, f"mesh.{axis} must be -1 (fill) or >= 1, got {size}")
    _require(
        [config.mesh.data, config.mesh.fsdp, config.mesh.tensor].count(-1) <= 1,
        "only one of mesh.data / mesh.fsdp / mesh.tensor may be -1",
    )
    _require(config.reward.workers >= 1, f"reward.workers must be >= 1, got {config.reward.workers}")
    _require(config.reward.timeout_s > 0, f"reward.timeout_s must be > 0, got {config.reward.timeout_s}")
    _require(
        config.reward.verifier in NAMED_VERIFIERS or ":" in config.reward.verifier,
        f"reward.verifier must be one of {sorted(NAMED_VERIFIERS)} or 'module:function', "
        f"got {config.reward.verifier!r}",
    )
    _require(
        bool(config.model.path) or bool(config.model.arch),
        "model.path (an HF folder) or model.arch (a config.json-style dict for random init) is required",
    )
    e = config.eval
    _require(e.n_samples >= 1, f"eval.n_samples must be >= 1, got {e.n_samples}")
    _require(e.max_new_tokens > 0, f"eval.max_new_tokens must be > 0, got {e.max_new_tokens}")
    _require(0 < e.top_p <= 1, f"eval.top_p must be in (0, 1], got {e.top_p}")
    _require(e.temperature >= 0, f"eval.temperature must be >= 0, got {e.temperature}")
    _require(e.prompts_per_batch >= 1, f"eval.prompts_per_batch must be >= 1, got {e.prompts_per_batch}")
    _require(t.eval_every >= 0, f"trainer.eval_every must be >= 0 (0 = no periodic validation), got {t.eval_every}")
    _require(t.eval_every == 0 or bool(config.data.val), "trainer.eval_every > 0 needs validation sets in data.val")
    _require(
        not t.val_before_train or bool(config.data.val),
        "trainer.val_before_train=true needs validation sets in data.val (name: source); or set it to false",
    )
    _require(
        t.dump_rollouts_every >= 0,
        f"trainer.dump_rollouts_every must be >= 0 (every N-th step's generations; 0 = off), got {t.dump_rollouts_every}",
    )
    _require(config.sft.steps >= 0 and config.sft.batch_size >= 1, "sft.steps must be >= 0 and sft.batch_size >= 1")
    _require(config.data.max_prompt_tokens > 0, "data.max_prompt_tokens must be > 0")
    _require(
        config.data.prompt_template == "chat" or not (config.data.system_prompt or config.data.chat_template_kwargs),
        "data.system_prompt and data.chat_template_kwargs go to the chat template, which "
        f"data.prompt_template={config.data.prompt_template!r} does not use; set data.prompt_template=chat or leave them empty",
    )
    _require(
        max(r.prompt_buckets) >= config.data.max_prompt_tokens,
        f"rollout.prompt_buckets (largest {max(r.prompt_buckets)}) must cover data.max_prompt_tokens="
        f"{config.data.max_prompt_tokens}",
    )
