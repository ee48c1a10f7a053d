"""The RL loop. Glue only: every piece of maths lives in the module that owns it.

    build     config -> tokenizer, data, mesh, policy, sharded train state, logger (every input
              checked before anything compiles); restore, or warm up (SFT) and save step 0
    loop      rollout [device] -> score: old log-probs [device, async] || rewards [host pool]
              -> update [device] -> log and save
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from pacs_jax import dynamic_sampling, run_files, sharding, xla_options
from pacs_jax.algorithms import overlong_penalty, truncated_responses
from pacs_jax.checkpoint import Checkpointer
from pacs_jax.compile_ahead import CompileAhead, batch_arrays
from pacs_jax.config import Config, ConfigError, save_config, to_dict
from pacs_jax.data import Example, PromptStream
from pacs_jax.metrics_log import MetricsLogger, read_metrics
from pacs_jax.models.tokenizer import Tokenizer
from pacs_jax.policy import (
    abstract_train_state, checkpoint_tree, config_tokenizer, decode_responses, export_hf, fresh_reference, load_examples,
    load_policy, needs_reference, policy_config,
)
from pacs_jax.rewards.pool import VerifierPool
from pacs_jax.sampler import Rollout, SamplingParams, generate, pad_prompts
from pacs_jax.stopping import StopRequest
from pacs_jax.update import (
    ROLLOUT_KEYS,
    TrainState,
    init_train_state,
    make_optimizer,
    make_prepare_fn,
    make_sft_step,
    make_train_optimizer,
    make_update_fn,
)

log = logging.getLogger("pacs_jax")


@dataclasses.dataclass
class Run:
    """What the loop works with. `state` is replaced by every update (which donates the old one)."""

    config: Config
    main: bool  # process 0: writes logs, plots and markers
    run_dir: Path  # local logs (a gs:// run's local mirror)
    checkpoint_dir: str
    tokenizer: Tokenizer
    train_examples: list[Example]
    val_sets: dict[str, list[Example]]
    mesh: jax.sharding.Mesh
    graphdefs: dict
    state: TrainState
    state_sharding: Any
    reference: Any  # GRPO's KL reference parameters, or None
    stream: PromptStream
    checkpointer: Checkpointer
    logger: MetricsLogger
    pool: VerifierPool
    sampling: SamplingParams
    prepare: Callable  # (params, reference, rollout arrays) -> old log-probs (+ values, reference log-probs)
    update: Callable  # (state, batch) -> (state, metrics); donates state
    key: jax.Array
    start_step: int
    # The reference's resets so far and the RL steps since the last one (the post-warm-up policy
    # counts as set at step 0); restored from the checkpoint's metrics.
    reference_resets: int = 0
    reference_age: int = 0
    # The first step's old-log-prob and update programs, compiling while its rollout runs.
    ahead: Optional[CompileAhead] = None


class Sampled(NamedTuple):
    """One step's rollout: device arrays (global) and their host copies."""

    examples: list[Example]
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    rollout: Rollout
    response_ids: np.ndarray
    response_mask: np.ndarray


class Verified(NamedTuple):
    """The verifier's rewards for this process's rows, and the pool's statistics."""

    scores: np.ndarray
    stats: dict


class Scored(NamedTuple):
    """The update's batch (device arrays) and what the step logs of it."""

    batch: dict
    scores: np.ndarray  # host, every row's reward
    metrics: dict  # reward and packing statistics


@dataclasses.dataclass
class Progress:
    """The newest step whose update finished, the data position after it and its metrics: what a
    failure saves (a step that failed before its update leaves no trace: a rerun takes it again)."""

    step: int
    data_position: dict
    metrics: Optional[dict] = None
    logged: bool = True


# ---------------------------------------------------------------------------------- loop


def train(config: Config) -> dict:
    """Run (or resume) training; returns paths of what it wrote."""
    t = config.trainer
    xla_options.set_compile_cache(t.compile_cache)  # before anything compiles
    xla_options.set_cpu_compile(t.cpu_compile)
    run = build(config)
    step = run.start_step
    progress = Progress(step, run.stream.state())
    stop = StopRequest()
    try:
        with stop, jax.set_mesh(run.mesh):
            if t.val_before_train and step == 0:
                run.logger.log(0, validate(run, 0))
            # The hosts agree at each step boundary (a collective), and only there: the decision
            # to stop after a step is also the decision to save it, the same on every host.
            stopping = stop.agreed()
            while step < t.total_steps and not stopping:
                step += 1
                timer = time.perf_counter()
                sampled, verified = collect(run, step)
                rollout_s = time.perf_counter() - timer
                scored = score(run, sampled, verified)
                reward_s = time.perf_counter() - timer - rollout_s
                run.state, update_metrics = update(run, scored.batch)
                update_metrics.update(reset_reference(run, step))
                step_s = time.perf_counter() - timer
                metrics = step_metrics(config, sampled, scored, update_metrics,
                                       rollout_s=rollout_s, reward_s=reward_s, step_s=step_s, epoch=run.stream.epoch)
                progress = Progress(step, run.stream.state(), metrics, logged=False)
                stopping = stop.agreed()
                log_and_save(run, step, sampled, scored.scores, metrics, final=step == t.total_steps or stopping)
                progress.logged = True
            if stopping:
                run.checkpointer.wait()
                log.warning("stopped by %s after step %d", stop.reason, step)  # every host
                _say(run.main, f"stopped by {stop.reason} after step {step}; checkpoint saved in {run.checkpoint_dir}. "
                     f"Run the same command again (trainer.resume=auto) to continue.")
    except BaseException:
        save_after_failure(run, progress)
        raise
    finally:
        run.pool.close()
        run.checkpointer.wait()
        run.checkpointer.close()
        run.logger.close()
    return finish(run, step)


# ------------------------------------------------------------------------------ phases


def collect(run: Run, step: int) -> tuple[Sampled, Optional[Verified]]:
    """This step's rollout: trainer.prompts_per_step prompts, or with trainer.dynamic_sampling,
    rounds of that many until the batch is full of groups whose rewards vary (then their rewards
    come checked already)."""
    if run.config.trainer.dynamic_sampling:
        return sample_varied_groups(run, step)
    return rollout(run, run.stream.next_batch(run.config.trainer.prompts_per_step), step), None


def rollout(run: Run, examples: list[Example], step: int, round_: int = 0) -> Sampled:
    """Sample `group_size` responses per prompt. Every process builds the same global prompt
    batch and feeds the rows its devices hold; the responses come back to every host."""
    t = run.config.trainer
    prompt_ids, prompt_mask = pad_prompts([e.prompt_ids for e in examples], run.config.rollout.prompt_buckets, run.tokenizer.pad_id)
    if run.ahead is None and not t.pack_row_tokens and not t.dynamic_sampling:
        run.ahead = compile_ahead(run, len(examples), prompt_ids.shape[1])
    first, last = sharding.process_slice(len(examples), run.mesh)
    prompts = sharding.shard_batch({"ids": prompt_ids[first:last], "mask": prompt_mask[first:last]}, run.mesh)
    key = jax.random.fold_in(run.key, step)
    key = jax.random.fold_in(key, round_) if round_ else key  # round 0 draws what a plain step draws
    out = generate((run.graphdefs["policy"], run.state.params["policy"]), prompts["ids"], prompts["mask"],
                   key, run.sampling, run.config.rollout.group_size)
    response_ids, response_mask = _to_host((out.response_ids, out.response_mask))
    return Sampled(examples, prompt_ids, prompt_mask, out, response_ids, response_mask)


def verify(run: Run, sampled: Sampled) -> Verified:
    """The verifier's rewards for this process's rows (the host pool, with hard time limits)."""
    first, last = sharding.process_slice(len(sampled.response_ids), run.mesh)
    texts = decode_responses(run.tokenizer, sampled.response_ids[first:last], sampled.response_mask[first:last])
    answers = [e.answer for e in sampled.examples for _ in range(run.config.rollout.group_size)][first:last]
    local_scores, stats = run.pool.submit(texts, answers).result()
    return Verified(np.asarray(local_scores, np.float32), stats)


def sample_varied_groups(run: Run, step: int) -> tuple[Sampled, Verified]:
    """DAPO's dynamic sampling (pacs_jax/dynamic_sampling.py): rounds of prompts_per_step prompts,
    at the one compiled shape, until prompts_per_step groups whose rewards vary are in hand, at
    most trainer.dynamic_sampling_max_rounds rounds (then all-equal groups fill the batch, and the
    log says so). The data position moves past every prompt sampled, so a resume is exact."""
    t, group, mesh = run.config.trainer, run.config.rollout.group_size, run.mesh
    rounds, varied, examples, stats = [], [], [], {}
    while len(rounds) < t.dynamic_sampling_max_rounds and sum(int(v.sum()) for v in varied) < t.prompts_per_step:
        sampled = rollout(run, run.stream.next_batch(t.prompts_per_step), step, round_=len(rounds))
        local = verify(run, sampled)
        scores = _to_host(sharding.shard_batch({"scores": local.scores}, mesh)["scores"])
        rounds.append({"prompt_ids": sampled.prompt_ids, "prompt_mask": sampled.prompt_mask, "scores": scores,
                       "response_ids": sampled.response_ids, "response_mask": sampled.response_mask,
                       "logprobs": _to_host(sampled.rollout.logprobs)})
        varied.append(dynamic_sampling.varied_groups(scores, group))
        examples.append(sampled.examples)
        stats = {k: stats.get(k, 0.0) + v for k, v in local.stats.items()}
    chosen = dynamic_sampling.choose_groups(varied, t.prompts_per_step)
    kept = sum(int(varied[r][g]) for r, g in chosen)
    if kept < t.prompts_per_step:
        log.warning("dynamic sampling: %d of %d groups vary after %d rounds; all-equal groups fill the rest",
                    kept, t.prompts_per_step, len(rounds))
    batch = dynamic_sampling.gather_groups(rounds, chosen, group, run.tokenizer.pad_id)
    rows = {"prompt_ids": np.repeat(batch["prompt_ids"], group, axis=0), "prompt_mask": np.repeat(batch["prompt_mask"], group, axis=0),
            "response_ids": batch["response_ids"], "response_mask": batch["response_mask"], "logprobs": batch["logprobs"]}
    first, last = sharding.process_slice(len(batch["scores"]), mesh)
    device = sharding.shard_batch({k: v[first:last] for k, v in rows.items()}, mesh)
    lengths = batch["response_mask"].sum(axis=1)
    rollout_arrays = Rollout(**device, lengths=lengths, decode_steps=np.int32(batch["response_mask"].shape[1]))
    sampled = Sampled([examples[r][g] for r, g in chosen], batch["prompt_ids"], batch["prompt_mask"], rollout_arrays,
                      batch["response_ids"], batch["response_mask"])
    stats.update({"filter/kept_groups": kept, "filter/rounds": len(rounds), "filter/prompts_sampled": len(rounds) * t.prompts_per_step})
    return sampled, Verified(batch["scores"][first:last], stats)


def score(run: Run, sampled: Sampled, verified: Optional[Verified] = None) -> Scored:
    """The update's batch: the rollout, its old log-probs (dispatched to the device first) and the
    verifier's rewards (checked on the host meanwhile, unless `verified` holds them already)."""
    config, mesh = run.config, run.mesh
    arrays = batch_arrays({k: getattr(sampled.rollout, k) for k in ROLLOUT_KEYS}, mesh)
    metrics = {}
    if config.trainer.pack_row_tokens:
        packed, metrics = _pack(config, mesh, sampled, run.tokenizer.pad_id)
        arrays.update(packed)
    if run.ahead is not None:
        run.ahead.wait_prepare()
    extras = run.prepare(run.state.params, run.reference, arrays)
    first, last = sharding.process_slice(len(sampled.response_ids), mesh)
    local_scores, reward_stats = verified if verified is not None else verify(run, sampled)
    # DAPO's overlong shaping: a penalty on the rewards of long responses (reward.overlong_buffer),
    # and the responses that reached the cap unfinished (algorithm.overlong_filter leaves them out).
    r, reward = config.rollout, config.reward
    truncated = truncated_responses(sampled.response_ids, sampled.response_mask, r.max_new_tokens, run.sampling.stop_ids)
    penalty = overlong_penalty(sampled.response_mask.sum(axis=1), r.max_new_tokens, reward.overlong_buffer, reward.overlong_penalty)
    scored = sharding.shard_batch({"rewards": np.asarray(local_scores, np.float32) + penalty[first:last],
                                   "truncated": truncated[first:last].astype(np.float32)}, mesh)
    metrics["response_length/truncated_fraction"] = float(truncated.mean())
    if reward.overlong_buffer:
        metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
    batch = batch_arrays({**arrays, **extras, **scored, "sampler_logprobs": sampled.rollout.logprobs}, mesh)
    return Scored(batch, _to_host(scored["rewards"]), {**reward_stats, **metrics})


def update(run: Run, batch: dict) -> tuple[TrainState, dict]:
    """One RL update (mini-batches x micro-batches); the old state is donated."""
    if run.ahead is not None:
        run.ahead.wait_update()
    state, metrics = run.update(run.state, batch)
    return state, jax.device_get(metrics)


def reset_reference(run: Run, step: int) -> dict:
    """Paper v2 (after ProRL): every algorithm.reference_reset_every RL steps, once this step's update
    is done, the reference becomes the current policy and the optimizer state starts afresh (the
    learning-rate schedule goes on): the checkpoint of this step holds the new reference. Returns
    the step's pacs/reference_resets and pacs/reference_age (steps since the last reset: 0 at one)."""
    if run.reference is None:
        return {}
    c = run.config
    run.reference_age += 1
    if c.algorithm.reference_reset_every and run.reference_age >= c.algorithm.reference_reset_every:
        optimizer = make_train_optimizer(c.algorithm, c.optimizer, c.trainer.total_steps * c.trainer.mini_batches)
        reference, opt_state = fresh_reference(run.state, optimizer, run.state_sharding)
        run.reference, run.state = reference, TrainState(run.state.params, opt_state)
        run.reference_resets, run.reference_age = run.reference_resets + 1, 0
        log.info("step %d: reference policy reset to the current policy (reset %d)", step, run.reference_resets)
    return {"pacs/reference_resets": run.reference_resets, "pacs/reference_age": run.reference_age}


def step_metrics(config: Config, sampled: Sampled, scored: Scored, update_metrics: dict, *,
                 rollout_s: float, reward_s: float, step_s: float, epoch: int) -> dict:
    lengths = sampled.response_mask.sum(axis=1)
    return {
        "reward/mean": float(np.mean(scored.scores)),
        **scored.metrics,
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/clip_fraction": float(np.mean(lengths == config.rollout.max_new_tokens)),
        **{k: float(v) for k, v in update_metrics.items()},
        "time/step_s": step_s,
        "time/rollout_s": rollout_s,
        "time/reward_s": reward_s,
        "time/update_s": step_s - rollout_s - reward_s,
        "tokens_per_s": float(lengths.sum()) / rollout_s,
        "data/epoch": epoch,
    }


def log_and_save(run: Run, step: int, sampled: Sampled, scores: np.ndarray, metrics: dict, final: bool) -> None:
    """Dump the rollouts, validate, log the step, and checkpoint it when due (or when `final`)."""
    t = run.config.trainer
    if run.main and t.dump_rollouts_every and step % t.dump_rollouts_every == 0:
        texts = decode_responses(run.tokenizer, sampled.response_ids, sampled.response_mask)
        run_files.dump_train_rollouts(run.run_dir, step, sampled.examples, texts, sampled.response_mask.sum(axis=1), scores,
                                      run.config.rollout.group_size)
    if t.eval_every and step % t.eval_every == 0:
        metrics.update(validate(run, step))
    run.logger.log(step, metrics)
    if t.save_every and step % t.save_every == 0 or final:
        run.checkpointer.save(step, checkpoint_tree(run.state, run.reference), _meta(step, run.stream.state(), run.config, metrics),
                              force=True)
        run_files.upload_logs(run.run_dir, t.run_dir, run.main)


def save_after_failure(run: Run, progress: Progress) -> None:
    """Nothing already trained is lost: log and save the newest complete step (its update
    finished), with the data position after it, if the state still exists: an update that raised
    before it ran (a compile error, say) has not donated it; one that failed while running has."""
    if progress.step <= run.start_step or not _alive(run.state):
        return
    if not progress.logged and progress.metrics is not None:
        try:
            run.logger.log(progress.step, progress.metrics)  # no hole in metrics.jsonl
            progress.logged = True
        except Exception as log_error:  # noqa: BLE001 -- the resumed run writes it from the checkpoint's meta
            log.error("could not log step %d after the failure: %s", progress.step, log_error)
    try:
        try:
            run.checkpointer.wait()  # an in-flight save of this step lands, or its error is spent
        except Exception:  # noqa: BLE001 -- that step is then not listed and is saved below
            pass
        if progress.step not in run.checkpointer.all_steps():
            meta = _meta(progress.step, progress.data_position, run.config, progress.metrics)
            run.checkpointer.save(progress.step, checkpoint_tree(run.state, run.reference), meta, force=True)
            run.checkpointer.wait()
            log.error("training failed after step %d; saved that step to %s before exiting", progress.step, run.checkpoint_dir)
    except Exception as save_error:  # noqa: BLE001 -- report the original error, not this one
        log.error("could not save after the failure: %s", save_error)


def finish(run: Run, step: int) -> dict:
    """The end of a complete run: plots, the HF export, then the DONE marker (a run whose export
    failed is not done: the spot loop starts it again, and it exports again)."""
    t = run.config.trainer
    outputs = {"run_dir": run.run_dir, "metrics": run.run_dir / "metrics.jsonl", "checkpoints": run.checkpoint_dir, "step": step}
    if step < t.total_steps:
        return outputs
    if run.main:
        from pacs_jax.plot import plot_runs

        outputs["plots"] = plot_runs([run.run_dir], run.run_dir / "plots") if step > 0 else []
        run_files.upload_logs(run.run_dir, t.run_dir, run.main)
    if t.export_hf:  # every process: each parameter is gathered from the hosts holding it
        policy = nnx.merge(run.graphdefs["policy"], run.state.params["policy"])
        outputs["export_hf"] = export_hf(policy, t.export_hf, run.config.model.tokenizer or run.config.model.path)
    if run.main:
        # The spot-VM loop and sweeps read this marker: the run needs no further restarts.
        for folder in {t.run_dir, run.checkpoint_dir}:
            (epath.Path(folder) / "DONE").write_text(f"{step}\n")
    return outputs


# ------------------------------------------------------------------------------ building


def build(config: Config) -> Run:
    """Everything the loop needs. Every input is checked before anything compiles; then the
    state is restored from the newest good checkpoint, or warmed up (SFT) and saved as step 0."""
    t, r, algorithm = config.trainer, config.rollout, config.algorithm
    # Logs are written locally; a gs:// run directory gets copies of them at every checkpoint.
    run_dir = run_files.local_run_dir(t.run_dir)
    main = sharding.is_main_process()
    tokenizer = config_tokenizer(config)
    train_examples = load_examples(config.data.train, config, tokenizer, "train")
    # Validation files are read only when something validates (they may exist only where it does).
    validating = bool(t.eval_every) or t.val_before_train
    val_sets = {name: load_examples(src, config, tokenizer, name) for name, src in config.data.val.items()} if validating else {}
    if config.sft.steps and any(not e.solution for e in train_examples):
        raise ConfigError(f"sft.steps={config.sft.steps} needs reference solutions, which {config.data.train} does not provide")
    decoder_config = policy_config(config, tokenizer)  # model.path's config.json: no weights read yet
    mesh = sharding.make_mesh(config.mesh)
    sharding.validate_mesh_for_model(
        mesh, decoder_config, t.prompts_per_step, r.group_size, mini_batches=t.mini_batches, micro_batches=t.micro_batches
    )

    checkpoint_dir = t.checkpoint_dir or f"{t.run_dir.rstrip('/')}/checkpoints"
    checkpointer = Checkpointer(checkpoint_dir, keep_last=t.keep_last, keep_every=t.keep_every, save_every=max(t.save_every, 1))
    if t.resume == "never":
        moved = run_files.move_earlier_run_aside(checkpointer, t.run_dir, run_dir, main)
        if moved:
            _say(main, f"trainer.resume=never: starting over; the earlier run is kept in {', '.join(moved)}")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_files.download_logs(t.run_dir, run_dir)
        save_config(config, run_dir / "config.yaml")
    optimizer = make_train_optimizer(algorithm, config.optimizer, t.total_steps * t.mini_batches)
    # The state as shapes and shardings first: a resumed run restores straight into its shards and
    # never reads model.path's weights.
    graphdefs, state = abstract_train_state(decoder_config, optimizer, with_critic=algorithm.name == "ppo")
    state_sharding = sharding.train_state_shardings(state, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sharding)
    logger = MetricsLogger(run_dir, t.total_steps, tensorboard=t.tensorboard, wandb=t.wandb,
                           wandb_project=t.wandb_project, config=to_dict(config), is_main_process=main)
    stream = PromptStream(train_examples, seed=t.seed, shuffle=config.data.shuffle)

    start_step, reference = 0, None
    # The reference policy (GRPO's KL term) is saved with the state, so the restore target holds
    # one too: the policy's own parameters give its shapes and shardings.
    target = checkpoint_tree(state, state.params["policy"] if needs_reference(config) else None)
    restored = checkpointer.restore_latest_good(target) if t.resume == "auto" else None
    if restored is not None:
        state, reference = restored.train_state["train"], restored.train_state.get("reference")
        stream.restore(restored.meta["data"])
        start_step = restored.step
        _continue_log(logger, run_dir, start_step, restored.meta.get("metrics"))
        log.info("resumed from %s step %d", checkpoint_dir, start_step)
    else:
        # Each host reads its devices' shards of the weights; the optimizer state is made sharded.
        _, state = init_train_state(load_policy(config, tokenizer, mesh), optimizer, with_critic=algorithm.name == "ppo", mesh=mesh)
        if config.sft.steps:
            state = _warm_up(config, graphdefs, state, train_examples, tokenizer, state_sharding)
        if needs_reference(config):
            reference = jax.tree.map(jnp.copy, state.params["policy"])
        checkpointer.save(0, checkpoint_tree(state, reference), _meta(0, stream.state(), config), force=True)
    if main and start_step < t.total_steps:
        for folder in {t.run_dir, checkpoint_dir}:  # a DONE from a shorter earlier run is stale
            (epath.Path(folder) / "DONE").unlink(missing_ok=True)

    sampling = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k, tuple(tokenizer.eos_ids), tokenizer.pad_id,
                              **r.engine_options())
    # Old log-probs in chunks of one micro-batch: the same peak memory as a gradient step. The
    # first mini-batch's are the update's own forward pass (on-policy by construction), so with
    # one mini-batch (and no critic or reference) this pass computes nothing.
    # `generate` returns each prompt's group_size responses as consecutive rows: with shared_prompts
    # the passes run each group's prompt once.
    prepare = make_prepare_fn(graphdefs, algorithm, temperature=r.temperature, chunks=t.mini_batches * t.micro_batches,
                              on_policy_chunks=t.micro_batches, prompt_group=r.group_size if t.shared_prompts else 0)
    update_fn = make_update_fn(
        graphdefs, optimizer, algorithm, group_size=r.group_size, mini_batches=t.mini_batches,
        micro_batches=t.micro_batches, temperature=r.temperature, state_sharding=state_sharding,
        shared_prompts=t.shared_prompts,
    )
    return Run(config, main, run_dir, checkpoint_dir, tokenizer, train_examples, val_sets, mesh, graphdefs, state,
               state_sharding, reference, stream, checkpointer, logger, VerifierPool.from_config(config.reward), sampling,
               prepare, update_fn, jax.random.key(t.seed), start_step,
               *_reference_count(restored.meta.get("metrics") if restored is not None else None, start_step, algorithm))


def compile_ahead(run: Run, prompts: int, prompt_width: int) -> CompileAhead:
    """The first step's old-log-prob and update programs, compiled on a worker thread while the
    rollout compiles and runs (their input types follow from the config and the prompt bucket)."""
    r = run.config.rollout
    return CompileAhead(run.prepare, run.update, run.state, run.reference, rows=prompts * r.group_size,
                        prompt_width=prompt_width, max_new_tokens=r.max_new_tokens, mesh=run.mesh)


def _warm_up(config: Config, graphdefs, state: TrainState, examples, tokenizer, state_sharding) -> TrainState:
    """Supervised warm-up on the task's reference solutions, so RL starts from partial success."""
    s = config.sft
    optimizer = make_optimizer(dataclasses.replace(config.optimizer, lr=s.lr, warmup_steps=0, schedule="constant"), s.steps)
    params = state.params["policy"]
    opt_state = optimizer.init(params)
    step_fn = make_sft_step(graphdefs["policy"], optimizer)
    stream = PromptStream(examples, seed=config.trainer.seed + 1)
    timer = time.perf_counter()
    for i in range(1, s.steps + 1):
        batch = sft_batch(stream.next_batch(s.batch_size), tokenizer, config)
        params, opt_state, metrics = step_fn(params, opt_state, batch)
        if i % max(1, s.steps // 10) == 0 or i == s.steps:
            loss = float(metrics["sft/loss"])
            _say(sharding.is_main_process(), f"sft step {i}/{s.steps} | loss {loss:.4f} | {time.perf_counter() - timer:.1f} s")
    params = jax.device_put(params, state_sharding.params["policy"])
    return TrainState(params={**state.params, "policy": params}, opt_state=state.opt_state)


def sft_batch(examples: list[Example], tokenizer: Tokenizer, config: Config) -> dict:
    """Prompts + reference solutions (ending in a stop token) as a rollout-shaped batch."""
    prompt_ids, prompt_mask = pad_prompts([e.prompt_ids for e in examples], config.rollout.prompt_buckets, tokenizer.pad_id)
    width = config.rollout.max_new_tokens
    response = np.full((len(examples), width), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(examples), width), np.int32)
    for row, example in enumerate(examples):
        ids = tokenizer.encode(example.solution)[: width - 1] + [tokenizer.eos_ids[0]]
        response[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": response, "response_mask": mask}


# ---------------------------------------------------------------------------- validation


def validate(run: Run, step: int) -> dict:
    """Validation metrics (`val/...`): greedy, one response per problem, or the eval section's
    sampling (trainer.val_sampling); the generations go to rollouts/val_<step>.jsonl when dumping.
    Prints one line per validation set."""
    from pacs_jax.evaluate import evaluate, flatten_metrics
    from pacs_jax.policy import make_sample_fn

    config = run.config
    greedy = config.trainer.val_sampling == "greedy"
    policy_split = (run.graphdefs["policy"], run.state.params["policy"])
    sample_fn = make_sample_fn(config, run.tokenizer, policy_split, jax.random.key(config.trainer.seed + 10**6 + step), greedy=greedy)
    limit = config.eval.max_problems or None
    examples = [e for examples in run.val_sets.values() for e in examples[:limit]]
    dump = run.main and config.trainer.dump_rollouts_every > 0
    result = evaluate(examples, sample_fn, run.pool, 1 if greedy else config.eval.n_samples,
                      rollouts_path=run.run_dir / run_files.ROLLOUTS_DIR / f"val_{step:06d}.jsonl" if dump else None, step=step)
    for source, values in result["sources"].items():
        passes = " ".join(f"{k} {v:.3f}" for k, v in values.items() if k.startswith("pass@"))
        _say(run.main, f"validation at step {step} | {source} | {passes} | {values['n_problems']} problems")
    return flatten_metrics(result, prefix="val/")


def summary(run_dir: Path) -> list[str]:
    """The end of a run in a few lines: reward over the first and last 10 steps, each validation
    metric before -> after."""
    if not (Path(run_dir) / "metrics.jsonl").is_file():  # total_steps=0 (a warm-up or export only) logs nothing
        return []
    all_records = read_metrics(run_dir)
    records = [r for r in all_records if r.get("step", 0) > 0 and "reward/mean" in r]
    lines = []
    if records:
        first, last = records[:10], records[-10:]
        mean = lambda rows: sum(r["reward/mean"] for r in rows) / len(rows)  # noqa: E731
        lines.append(f"  reward:      {mean(first):.3f} (first {len(first)} steps) -> {mean(last):.3f} (last {len(last)} steps)")
    validations = [r for r in all_records if any(k.startswith("val/") and k.endswith("/pass@1") for k in r)]
    if len(validations) >= 1:
        before, after = validations[0], validations[-1]
        for key in sorted(k for k in after if k.startswith("val/") and k.endswith("/pass@1")):
            if key in before:
                lines.append(f"  {key}: {before[key]:.3f} (step {before['step']}) -> {after[key]:.3f} (step {after['step']})")
    return lines


# ------------------------------------------------------------------------------- helpers


def _pack(config: Config, mesh, sampled: Sampled, pad_id: int):
    """The packed layout (pacs_jax.packing) of this step's rollout, planned identically on every
    process from the global host arrays; each process feeds the rows its devices hold."""
    from pacs_jax.packing import pack_rollout

    t, group = config.trainer, config.rollout.group_size
    packed, stats = pack_rollout(
        np.repeat(sampled.prompt_ids, group, axis=0), np.repeat(sampled.prompt_mask, group, axis=0),
        sampled.response_ids, sampled.response_mask,
        micro_batches=t.mini_batches * t.micro_batches, row_tokens=t.pack_row_tokens,
        row_multiple=sharding.batch_size_divisor(mesh), pad_id=pad_id,
    )
    local = {k: v[slice(*sharding.process_slice(len(v), mesh))] for k, v in packed.items()}
    return sharding.shard_batch(local, mesh), stats


def _to_host(tree):
    """Global arrays as NumPy on every process (multi-host: gathered from all of them)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _alive(state) -> bool:
    """Whether every buffer of `state` still exists (a donating call that ran deletes them)."""
    return not any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state))


def _continue_log(logger: MetricsLogger, run_dir: Path, step: int, saved_metrics: Optional[dict]) -> None:
    """A resumed log: records past the restored step go (logged before a preemption whose
    checkpoint never landed); the restored step's record is written from the checkpoint when the
    log lacks it (a failure between saving and logging), so the log has no holes."""
    # Step 0 has no training record, only the validation before training, which runs again.
    logger.truncate_after(step if step > 0 else -1)
    if step > 0 and logger.active and saved_metrics:
        logged = {r["step"] for r in read_metrics(run_dir)} if (run_dir / "metrics.jsonl").is_file() else set()
        if step not in logged:
            logger.log(step, saved_metrics)


def _reference_count(saved_metrics: Optional[dict], step: int, algorithm) -> tuple[int, int]:
    """(resets, age) of the reference at a restored step: what that step logged (its checkpoint's
    metrics), else what the reset interval implies (step 0; a checkpoint without them)."""
    saved_metrics = saved_metrics or {}
    if "pacs/reference_age" in saved_metrics:
        return int(saved_metrics["pacs/reference_resets"]), int(saved_metrics["pacs/reference_age"])
    every = algorithm.reference_reset_every
    return (step // every, step % every) if every else (0, step)


def _meta(step: int, data_position: dict, config: Config, metrics: Optional[dict] = None) -> dict:
    meta = {"step": step, "data": data_position, "seed": config.trainer.seed, "config": to_dict(config)}
    if metrics:
        meta["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}
    return meta


def _say(main: bool, message: str) -> None:
    if main:
        print(message, flush=True)


def main(config: Config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    outputs = train(config)
    if sharding.is_main_process() and outputs["step"] == config.trainer.total_steps:
        print(f"\ndone: {outputs['step']} steps")
        for line in summary(outputs["run_dir"]):
            print(line)
        print(f"  metrics:     {outputs['metrics']}")
        print(f"  plots:       {', '.join(str(p) for p in outputs.get('plots', []))}")
        print(f"  checkpoints: {outputs['checkpoints']}")
        if "export_hf" in outputs:
            print(f"  HF export:   {outputs['export_hf']}")
