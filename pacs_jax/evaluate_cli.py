"""`python -m pacs_jax eval`: pass@k of a training checkpoint, an HF model, or the config's model."""

from __future__ import annotations

import argparse

import jax
from etils import epath
from flax import nnx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config: model, data.val sets, eval sampling, reward")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a run's checkpoint directory (RUN_DIR/checkpoints); latest step unless --step")
    source.add_argument("--model", help="a Hugging Face model folder (instead of the config's model.path)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=SOURCE",
                        help="evaluation set (repeatable); default: the config's data.val")
    parser.add_argument("--out", default="", help="where eval_metrics.json / eval_rollouts.jsonl go (default: RUN_DIR/eval)")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides, e.g. eval.n_samples=16")


def run(args: argparse.Namespace) -> int:
    from pacs_jax import run_files, sharding, xla_options
    from pacs_jax.config import ConfigError, load_config
    from pacs_jax.evaluate import evaluate_sets
    from pacs_jax.models.tokenizer import load_tokenizer
    from pacs_jax.rewards.pool import VerifierPool
    from pacs_jax.policy import load_examples, load_policy, make_sample_fn, restore_policy

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.path={args.model}")
    config = load_config(args.config, overrides)
    xla_options.set_compile_cache(config.trainer.compile_cache)
    xla_options.set_cpu_compile(config.trainer.cpu_compile)
    sets = dict(config.data.val)
    for item in args.data:
        if "=" not in item:
            raise ConfigError(f"--data {item!r} must look like NAME=SOURCE (a file, a dataset name or synthetic:TASK)")
        name, source = item.split("=", 1)
        sets[name] = source
    if not sets:
        raise ConfigError("nothing to evaluate: set data.val in the config or pass --data NAME=SOURCE")

    # The policy sharded over the slice's mesh (config.mesh) as the trainer shards it; a checkpoint
    # gives its policy alone (any algorithm or optimizer restores with this config).
    mesh = sharding.make_mesh(config.mesh)
    main = sharding.is_main_process()
    if args.checkpoint:
        policy, tokenizer = restore_policy(config, args.checkpoint, args.step, placement=mesh)
    else:
        tokenizer = load_tokenizer(config.model.tokenizer or config.model.path or "", config.model.chat_template)
        policy = load_policy(config, tokenizer, mesh)
    examples = {name: load_examples(source, config, tokenizer, name)[: config.eval.max_problems or None]
                for name, source in sets.items()}
    # Written by process 0; a gs:// destination is written locally first, then copied there.
    remote_out = args.out or f"{config.trainer.run_dir.rstrip('/')}/eval"
    out_dir = run_files.local_run_dir(remote_out)
    sample_fn = make_sample_fn(config, tokenizer, nnx.split(policy), jax.random.key(config.trainer.seed), mesh=mesh)
    # What the samples depend on: a rerun with these settings resumes (out_dir/parts), other ones stop.
    e, d = config.eval, config.data
    settings = {"model": args.checkpoint or config.model.path or "model.arch", "step": args.step,
                "seed": config.trainer.seed, "verifier": config.reward.verifier,
                "sampling": [e.temperature, e.top_p, e.max_new_tokens, e.prompts_per_batch],
                "prompt": [d.prompt_template, d.instruction, d.system_prompt, d.chat_template_kwargs]}
    with jax.set_mesh(mesh), VerifierPool.from_config(config.reward) as pool:
        # Resumable in chunks of one sampling batch: a preempted evaluation loses one batch at most.
        result = evaluate_sets(examples, sample_fn, pool, e.n_samples, out_dir, settings=settings, chunk=e.prompts_per_batch,
                               write=main, log=print if main else lambda line: None)
    if not main:
        return 0
    for source, metrics in result["sources"].items():
        passes = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k.startswith("pass@"))
        print(f"{source:>16}: {passes}  accuracy {metrics['accuracy']:.3f}  length {metrics['response_length/mean']:.1f}")
    if remote_out != str(out_dir):  # a gs:// destination
        for name in ("eval_metrics.json", "eval_table.md", "eval_rollouts.jsonl"):
            target = epath.Path(remote_out) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((out_dir / name).read_bytes())
    print(f"wrote {remote_out}/eval_metrics.json, eval_table.md and eval_rollouts.jsonl")
    return 0
