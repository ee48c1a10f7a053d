"""The RL loop. Glue only: every piece of maths lives in the module that owns it.

    build (config -> tokenizer, data, policy, optimizer, mesh; all checked before compiling)
    restore or warm up (SFT)
    loop: prompts -> rollout [device] -> old log-probs [device, async] || rewards [host pool]
          -> update [device] -> metrics -> checkpoint
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from pacs_jax import sharding, xla_options
from pacs_jax.checkpoint import Checkpointer
from pacs_jax.compile_ahead import CompileAhead, batch_arrays
from pacs_jax.config import Config, ConfigError, save_config, to_dict
from pacs_jax.data import Example, PromptStream, build_examples, load_rows
from pacs_jax.metrics_log import TENSORBOARD_DIR, WANDB_ID_FILE, MetricsLogger
from pacs_jax.models import DecoderConfig, from_pretrained, init_decoder, read_hf_config
from pacs_jax.models.tokenizer import Tokenizer, load_tokenizer
from pacs_jax.rewards.pool import VerifierPool
from pacs_jax.rollout import SamplingParams, generate, pad_prompts
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


# ------------------------------------------------------------------------------ building


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


def load_examples(source: str, config: Config, tokenizer: Tokenizer, name: str) -> list[Example]:
    rows = load_rows(source, config.data, name=name)
    examples, _ = build_examples(rows, tokenizer, config.data)
    return examples


def decode_responses(tokenizer: Tokenizer, response_ids: np.ndarray, response_mask: np.ndarray) -> list[str]:
    return [tokenizer.decode(ids[mask == 1].tolist()) for ids, mask in zip(response_ids, response_mask)]


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


class StopRequest:
    """SIGTERM / SIGINT (a spot VM being preempted, Ctrl-C) ask the loop to save and leave."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: leave now
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving, then exiting", self.signal_name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------- loop


def train(config: Config) -> dict:
    """Run (or resume) training; returns paths of what it wrote."""
    t, r = config.trainer, config.rollout
    xla_options.set_compile_cache(t.compile_cache)  # before anything compiles
    xla_options.set_cpu_compile(t.cpu_compile)
    # Logs are written locally; a gs:// run directory gets copies of them at every checkpoint.
    run_dir = local_run_dir(t.run_dir)
    main = sharding.is_main_process()

    # Everything that can be wrong with the inputs is checked here, before anything compiles.
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.path or "", config.model.chat_template)
    train_examples = load_examples(config.data.train, config, tokenizer, "train")
    # Validation files are read only when something validates (they may exist only where it does).
    validating = bool(t.eval_every) or t.val_before_train
    val_sets = {name: load_examples(src, config, tokenizer, name) for name, src in config.data.val.items()} if validating else {}
    if config.sft.steps and any(not e.solution for e in train_examples):
        raise ConfigError(f"sft.steps={config.sft.steps} needs reference solutions, which {config.data.train} does not provide")
    policy = load_policy(config, tokenizer)
    mesh = sharding.make_mesh(config.mesh)
    sharding.validate_mesh_for_model(
        mesh, policy.config, t.prompts_per_step, r.group_size, mini_batches=t.mini_batches, micro_batches=t.micro_batches
    )

    checkpoint_dir = t.checkpoint_dir or f"{t.run_dir.rstrip('/')}/checkpoints"
    checkpointer = Checkpointer(checkpoint_dir, keep_last=t.keep_last, keep_every=t.keep_every, save_every=max(t.save_every, 1))
    if t.resume == "never":
        _move_earlier_run_aside(checkpointer, t.run_dir, run_dir, main)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _download_logs(t.run_dir, run_dir)
        save_config(config, run_dir / "config.yaml")
    algorithm = config.algorithm
    total_updates = t.total_steps * t.mini_batches
    optimizer = make_train_optimizer(algorithm, config.optimizer, total_updates)
    graphdefs, state = init_train_state(policy, optimizer, with_critic=algorithm.name == "ppo")
    state_sharding = sharding.train_state_shardings(state, mesh)
    state = jax.device_put(state, state_sharding)
    needs_reference = algorithm.name == "grpo" and algorithm.kl_coef > 0

    logger = MetricsLogger(run_dir, t.total_steps, tensorboard=t.tensorboard, wandb=t.wandb,
                           wandb_project=t.wandb_project, config=to_dict(config), is_main_process=main)
    stream = PromptStream(train_examples, seed=t.seed, shuffle=config.data.shuffle)
    base_key = jax.random.key(t.seed)

    start_step, reference = 0, None
    # The reference policy (GRPO's KL term) is saved with the state, so the restore target holds
    # one too: the policy's own parameters give its shapes and shardings.
    target = _checkpoint_tree(state, state.params["policy"] if needs_reference else None)
    restored = checkpointer.restore_latest_good(target) if t.resume == "auto" else None
    if restored is not None:
        state, reference = restored.train_state["train"], restored.train_state.get("reference")
        stream.restore(restored.meta["data"])
        start_step = restored.step
        # Step 0 has no training record, only the validation before training, which runs again.
        logger.truncate_after(start_step if start_step > 0 else -1)
        log.info("resumed from %s step %d", checkpoint_dir, start_step)
    else:
        if config.sft.steps:
            state = _warm_up(config, graphdefs, state, train_examples, tokenizer, logger, state_sharding)
        if needs_reference:
            reference = jax.tree.map(jnp.copy, state.params["policy"])
        checkpointer.save(0, _checkpoint_tree(state, reference), _meta(0, stream.state(), config), force=True)

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
    update = make_update_fn(
        graphdefs, optimizer, algorithm, group_size=r.group_size, mini_batches=t.mini_batches,
        micro_batches=t.micro_batches, temperature=r.temperature, state_sharding=state_sharding,
        shared_prompts=t.shared_prompts,
    )
    pool = VerifierPool.from_config(config.reward)
    step, state_valid = start_step, True
    ahead = None  # the first step's passes, compiled while its rollout compiles and runs
    # The newest step whose update has finished and the data position after it: what a failure
    # saves, so that a rerun takes a step that failed half-way again from its start.
    complete = (start_step, stream.state())
    try:
        with StopRequest() as stop, jax.set_mesh(mesh):
            if t.val_before_train and start_step == 0:
                logger.log(0, _validate(config, graphdefs, state, val_sets, tokenizer, pool, 0, run_dir, main))
            while step < t.total_steps and stop.signal_name is None:
                step += 1
                timer = time.perf_counter()
                examples = stream.next_batch(t.prompts_per_step)
                prompt_ids, prompt_mask = pad_prompts([e.prompt_ids for e in examples], r.prompt_buckets, tokenizer.pad_id)
                # Every process builds the same global batch and feeds the rows its devices hold.
                first, last = sharding.process_slice(len(examples), mesh)
                prompts = sharding.shard_batch({"ids": prompt_ids[first:last], "mask": prompt_mask[first:last]}, mesh)
                if ahead is None and not t.pack_row_tokens:
                    ahead = CompileAhead(prepare, update, state, reference, rows=len(examples) * r.group_size,
                                         prompt_width=prompt_ids.shape[1], max_new_tokens=r.max_new_tokens, mesh=mesh)
                rollout = generate((graphdefs["policy"], state.params["policy"]), prompts["ids"], prompts["mask"],
                                   jax.random.fold_in(base_key, step), sampling, r.group_size)
                response_ids, response_mask = _to_host((rollout.response_ids, rollout.response_mask))
                rollout_s = time.perf_counter() - timer

                # Dispatch the old log-probs, then check answers on the host while the device works.
                rollout_arrays = batch_arrays({k: getattr(rollout, k) for k in ROLLOUT_KEYS}, mesh)
                pack_stats = {}
                if t.pack_row_tokens:
                    packed, pack_stats = _pack(config, mesh, prompt_ids, prompt_mask, response_ids, response_mask, tokenizer.pad_id)
                    rollout_arrays.update(packed)
                if ahead is not None:
                    ahead.wait_prepare()
                extras = prepare(state.params, reference, rollout_arrays)
                first, last = sharding.process_slice(len(response_ids), mesh)
                texts = decode_responses(tokenizer, response_ids[first:last], response_mask[first:last])
                answers = [e.answer for e in examples for _ in range(r.group_size)][first:last]
                local_scores, reward_stats = pool.submit(texts, answers).result()
                rewards = sharding.shard_batch({"rewards": np.asarray(local_scores, np.float32)}, mesh)["rewards"]
                scores = _to_host(rewards)
                reward_s = time.perf_counter() - timer - rollout_s

                batch = batch_arrays({**rollout_arrays, **extras, "rewards": rewards, "sampler_logprobs": rollout.logprobs}, mesh)
                if ahead is not None:
                    ahead.wait_update()
                state_valid = False  # the update donates the state
                state, update_metrics = update(state, batch)
                update_metrics = jax.device_get(update_metrics)
                state_valid = True
                complete = (step, stream.state())
                step_s = time.perf_counter() - timer

                lengths = response_mask.sum(axis=1)
                metrics = {
                    "reward/mean": float(np.mean(scores)),
                    **reward_stats,
                    "response_length/mean": float(lengths.mean()),
                    "response_length/max": float(lengths.max()),
                    "response_length/clip_fraction": float(np.mean(lengths == r.max_new_tokens)),
                    **{k: float(v) for k, v in update_metrics.items()},
                    **pack_stats,
                    "time/step_s": step_s,
                    "time/rollout_s": rollout_s,
                    "time/reward_s": reward_s,
                    "time/update_s": step_s - rollout_s - reward_s,
                    "tokens_per_s": float(lengths.sum()) / rollout_s,
                    "data/epoch": stream.epoch,
                }
                if main and t.dump_rollouts_every and step % t.dump_rollouts_every == 0:
                    _dump_train_rollouts(run_dir, step, examples, tokenizer, response_ids, response_mask, scores, r.group_size)
                if t.eval_every and step % t.eval_every == 0:
                    metrics.update(_validate(config, graphdefs, state, val_sets, tokenizer, pool, step, run_dir, main))
                logger.log(step, metrics)
                if t.save_every and step % t.save_every == 0 or step == t.total_steps or stop.signal_name:
                    checkpointer.save(step, _checkpoint_tree(state, reference), _meta(step, stream.state(), config, metrics), force=True)
                    _upload_logs(run_dir, t.run_dir, main)
            if stop.signal_name:
                checkpointer.wait()
                _say(main, f"stopped by {stop.signal_name} after step {step}; checkpoint saved in {checkpoint_dir}. "
                     f"Run the same command again (trainer.resume=auto) to continue.")
    except BaseException:
        # Nothing already trained is lost: save the newest complete step (its update finished),
        # with the data position after it, if the state still exists (the update donates it).
        # A step that failed before its update leaves no trace, so a rerun takes it again.
        done_step, data_position = complete
        if state_valid and done_step > start_step:
            try:
                try:
                    checkpointer.wait()  # an in-flight save of done_step lands, or its error is spent
                except Exception:  # noqa: BLE001 -- that step is then not listed and is saved below
                    pass
                if done_step not in checkpointer.all_steps():
                    checkpointer.save(done_step, _checkpoint_tree(state, reference), _meta(done_step, data_position, config), force=True)
                    checkpointer.wait()
                    log.error("training failed after step %d; saved that step to %s before exiting", done_step, checkpoint_dir)
            except Exception as save_error:  # noqa: BLE001 -- report the original error, not this one
                log.error("could not save after the failure: %s", save_error)
        raise
    finally:
        pool.close()
        checkpointer.wait()
        checkpointer.close()
        logger.close()

    outputs = {"run_dir": run_dir, "metrics": run_dir / "metrics.jsonl", "checkpoints": checkpoint_dir, "step": step}
    if main and step == t.total_steps:
        from pacs_jax.plot import plot_runs

        outputs["plots"] = plot_runs([run_dir], run_dir / "plots") if step > 0 else []
        _upload_logs(run_dir, t.run_dir, main)
        # The spot-VM loop and sweeps read this marker: the run needs no further restarts.
        for folder in {t.run_dir, checkpoint_dir}:
            (epath.Path(folder) / "DONE").write_text(f"{step}\n")
    if t.export_hf and step == t.total_steps:
        from pacs_jax.models import save_pretrained

        policy = nnx.merge(graphdefs["policy"], state.params["policy"])
        if main:
            tokenizer_dir = config.model.tokenizer or config.model.path
            save_pretrained(policy, t.export_hf, tokenizer_dir if tokenizer_dir and Path(tokenizer_dir).is_dir() else None)
        outputs["export_hf"] = Path(t.export_hf)
    return outputs


def local_run_dir(run_dir: str) -> Path:
    """Where logs are written: run_dir itself, or for a remote (gs://) run a local mirror
    under $PACS_JAX_LOCAL_RUNS (default ~/pacs_jax_runs)."""
    if "://" not in run_dir:
        return Path(run_dir)
    root = Path(os.environ.get("PACS_JAX_LOCAL_RUNS", "~/pacs_jax_runs")).expanduser()
    return root / run_dir.split("://", 1)[1].strip("/").replace("/", "__")


# What a remote (gs://) run keeps of its local logs, so that a run resumed on a new VM continues
# them: the metrics, the config, the W&B run id (the same W&B run goes on) and the TensorBoard
# event files (every file of that folder; a resumed session adds its own next to them).
_LOG_FILES = ("metrics.jsonl", "config.yaml", WANDB_ID_FILE)
_LOG_FOLDERS = (TENSORBOARD_DIR,)


def _download_logs(remote: str, local: Path) -> None:
    """A resumed remote run continues the logs it had (the VM that wrote them may be gone)."""
    if "://" not in remote:
        return
    for name in _LOG_FILES:
        source = epath.Path(remote) / name
        if source.exists() and not (local / name).exists():
            (local / name).write_text(source.read_text())
    for folder in _LOG_FOLDERS:
        source = epath.Path(remote) / folder
        if not source.exists():
            continue
        for path in source.iterdir():
            target = local / folder / path.name
            if not target.exists() and path.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())


def _upload_logs(local: Path, remote: str, main: bool) -> None:
    if "://" not in remote or not main:
        return
    files = [local / name for name in _LOG_FILES]
    files += [path for folder in _LOG_FOLDERS if (local / folder).is_dir() for path in sorted((local / folder).iterdir())]
    files += sorted((local / "plots").glob("*.png"))
    for path in files:
        if path.is_file():
            target = epath.Path(remote) / path.relative_to(local).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())


def _pack(config: Config, mesh, prompt_ids, prompt_mask, response_ids, response_mask, pad_id: int):
    """The packed layout (pacs_jax.packing) of this step's rollout, planned identically on every
    process from the global host arrays; each process feeds the rows its devices hold."""
    from pacs_jax.packing import pack_rollout

    t, group = config.trainer, config.rollout.group_size
    packed, stats = pack_rollout(
        np.repeat(prompt_ids, group, axis=0), np.repeat(prompt_mask, group, axis=0), response_ids, response_mask,
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


def _checkpoint_tree(state: TrainState, reference) -> dict:
    tree: dict[str, Any] = {"train": state}
    if reference is not None:
        tree["reference"] = reference
    return tree


def _meta(step: int, data_position: dict, config: Config, metrics: Optional[dict] = None) -> dict:
    meta = {"step": step, "data": data_position, "seed": config.trainer.seed, "config": to_dict(config)}
    if metrics:
        meta["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and np.isfinite(v)}
    return meta


def _say(main: bool, message: str) -> None:
    if main:
        print(message, flush=True)


def _warm_up(config: Config, graphdefs, state: TrainState, examples, tokenizer, logger, state_sharding) -> TrainState:
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


def _validate(config: Config, graphdefs, state: TrainState, val_sets, tokenizer, pool, step: int, run_dir: Path, main: bool) -> dict:
    """Validation metrics (`val/...`): greedy, one response per problem, or the eval section's
    sampling (trainer.val_sampling); the generations go to rollouts/val_<step>.jsonl when dumping."""
    from pacs_jax.evaluate import evaluate, flatten_metrics

    greedy = config.trainer.val_sampling == "greedy"
    policy_split = (graphdefs["policy"], state.params["policy"])
    sample_fn = make_sample_fn(config, tokenizer, policy_split, jax.random.key(config.trainer.seed + 10**6 + step), greedy=greedy)
    limit = config.eval.max_problems or None
    examples = [e for examples in val_sets.values() for e in examples[:limit]]
    dump = main and config.trainer.dump_rollouts_every > 0
    result = evaluate(examples, sample_fn, pool, 1 if greedy else config.eval.n_samples,
                      rollouts_path=run_dir / ROLLOUTS_DIR / f"val_{step:06d}.jsonl" if dump else None, step=step)
    return flatten_metrics(result, prefix="val/")


ROLLOUTS_DIR = "rollouts"


def _dump_train_rollouts(run_dir: Path, step: int, examples, tokenizer, response_ids, response_mask, scores, group_size: int) -> None:
    """This step's prompts, responses and rewards as rollouts/train_<step>.jsonl (all processes' rows)."""
    from pacs_jax.evaluate import write_rollouts

    texts = decode_responses(tokenizer, response_ids, response_mask)
    lengths = response_mask.sum(axis=1)
    samples = [[(texts[row], lengths[row]) for row in range(i * group_size, (i + 1) * group_size)] for i in range(len(examples))]
    write_rollouts(run_dir / ROLLOUTS_DIR / f"train_{step:06d}.jsonl", examples, samples, scores, group_size, step=step)


# What an earlier run left in a run directory; trainer.resume=never moves these aside.
RUN_FILES = ("metrics.jsonl", "config.yaml", "tensorboard", "plots", ROLLOUTS_DIR, "DONE", "wandb_run_id")


def _move_earlier_run_aside(checkpointer: Checkpointer, run_dir: str, local_dir: Path, main: bool) -> None:
    """trainer.resume=never: start over without deleting anything. Checkpoint steps move into
    <checkpoint_dir>/replaced-<time>/, the earlier run's logs into <run_dir>/replaced-<time>/."""
    name = f"replaced-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    moved = [checkpointer.move_aside(name)]
    if main:
        folders = {epath.Path(run_dir), epath.Path(local_dir), epath.Path(checkpointer.directory)}
        for folder in folders:  # a gs:// run also has its remote copies of the logs
            present = [folder / item for item in RUN_FILES if (folder / item).exists()]
            if present:
                (folder / name).mkdir(parents=True, exist_ok=True)
                for path in present:
                    path.rename(folder / name / path.name)
                moved.append(folder / name)
    moved = sorted({str(path) for path in moved if path is not None})
    if moved:
        _say(main, f"trainer.resume=never: starting over; the earlier run is kept in {', '.join(moved)}")


def restore_policy(config: Config, checkpoint_dir: str, step: Optional[int] = None):
    """The policy of a training checkpoint (latest step by default), as an NNX Decoder."""
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.path or "", config.model.chat_template)
    policy = load_policy(config, tokenizer)
    optimizer = make_train_optimizer(config.algorithm, config.optimizer, config.trainer.total_steps * config.trainer.mini_batches)
    graphdefs, state = init_train_state(policy, optimizer, with_critic=config.algorithm.name == "ppo")
    reference = state.params["policy"] if config.algorithm.name == "grpo" and config.algorithm.kl_coef > 0 else None
    with Checkpointer(checkpoint_dir, async_save=False) as checkpointer:
        tree, _ = checkpointer.restore(_checkpoint_tree(state, reference), step)
    return nnx.merge(graphdefs["policy"], tree["train"].params["policy"]), tokenizer


def make_sample_fn(config: Config, tokenizer: Tokenizer, policy_split, key, greedy: bool = False):
    """sample_fn(examples, n) -> per example n (text, length) pairs, with the eval sampling settings
    (greedy: temperature 0), in fixed-size batches (the last one padded with repeats) so every
    batch reuses one program."""
    e = config.eval
    temperature, top_p = (0.0, 1.0) if greedy else (e.temperature, e.top_p)
    sampling = SamplingParams(e.max_new_tokens, temperature, top_p, 0, tuple(tokenizer.eos_ids), tokenizer.pad_id,
                              **config.rollout.engine_options())

    def sample_fn(examples: list[Example], n_samples: int):
        results = []
        for start in range(0, len(examples), e.prompts_per_batch):
            chunk = examples[start : start + e.prompts_per_batch]
            padded = chunk + [chunk[-1]] * (e.prompts_per_batch - len(chunk))
            ids, mask = pad_prompts([x.prompt_ids for x in padded], config.rollout.prompt_buckets, tokenizer.pad_id)
            out = generate(policy_split, ids, mask, jax.random.fold_in(key, start), sampling, n_samples)
            response_ids, response_mask = jax.device_get((out.response_ids, out.response_mask))
            texts = decode_responses(tokenizer, response_ids, response_mask)
            lengths = response_mask.sum(axis=1)
            for i in range(len(chunk)):
                rows = range(i * n_samples, (i + 1) * n_samples)
                results.append([(texts[j], int(lengths[j])) for j in rows])
        return results

    return sample_fn


def main(config: Config) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    outputs = train(config)
    if sharding.is_main_process() and outputs["step"] == config.trainer.total_steps:
        print(f"\ndone: {outputs['step']} steps")
        print(f"  metrics:     {outputs['metrics']}")
        print(f"  plots:       {', '.join(str(p) for p in outputs.get('plots', []))}")
        print(f"  checkpoints: {outputs['checkpoints']}")
        if "export_hf" in outputs:
            print(f"  HF export:   {outputs['export_hf']}")
