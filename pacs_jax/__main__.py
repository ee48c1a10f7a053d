"""Command line: python -m pacs_jax {train, eval, generate, convert, sweep, compile, plot} ..."""

from __future__ import annotations

import argparse
import logging
import sys


def join_processes(shared_dirs: dict[str, str]) -> None:
    """Multi-host: join the other hosts' processes (a no-op for one process, a one-host TPU VM
    included), then check that every directory in `shared_dirs` (config key -> path) is one all
    hosts see, before anything is loaded or compiled."""
    from pacs_jax import sharding

    if sharding.initialize_distributed():
        import jax

        print(f"pacs_jax: process {jax.process_index()} of {jax.process_count()}, "
              f"{jax.local_device_count()} of {jax.device_count()} devices here", file=sys.stderr, flush=True)
        sharding.require_shared_dirs(shared_dirs)


def _train(args) -> int:
    from pacs_jax import gcs, train
    from pacs_jax.config import load_config

    config = load_config(args.config, args.overrides)
    join_processes({"trainer.run_dir": config.trainer.run_dir, "trainer.checkpoint_dir": config.trainer.checkpoint_dir})
    train.main(gcs.stage_inputs(config))
    return 0


def stage_eval_inputs(args) -> None:
    """gs:// paths of an eval (--model, --data, and the config's model and data.val) replaced by
    their local copies, fetched once per machine as `train` does (pacs_jax.gcs)."""
    from pacs_jax import gcs
    from pacs_jax.config import load_config

    if args.model and args.model.startswith("gs://"):
        args.model = str(gcs.local_copy(args.model, "--model"))
    data = []
    for item in args.data:
        name, _, source = item.partition("=")
        data.append(f"{name}={gcs.local_copy(source, f'--data {name}')}" if source.startswith("gs://") else item)
    args.data = data
    config = load_config(args.config, args.overrides)
    extra = [f"model.{key}={gcs.local_copy(getattr(config.model, key), f'model.{key}')}"
             for key in ("path", "tokenizer") if getattr(config.model, key).startswith("gs://") and not (key == "path" and args.model)]
    extra += [f"data.val.{name}={gcs.local_copy(source, f'data.val.{name}')}"
              for name, source in config.data.val.items() if str(source).startswith("gs://")]
    args.overrides = [*args.overrides, *extra]


def _eval(args) -> int:
    from pacs_jax import evaluate_cli

    join_processes({"--checkpoint": args.checkpoint or ""})
    stage_eval_inputs(args)
    return evaluate_cli.run(args)


def _generate(args) -> int:
    import jax

    from pacs_jax.models import from_pretrained
    from pacs_jax.models.tokenizer import load_tokenizer
    from pacs_jax.sampler import SamplingParams, generate, pad_prompts

    tokenizer = load_tokenizer(args.tokenizer or args.model, args.chat_template or "")
    model = from_pretrained(args.model, dtype=args.dtype)
    if args.chat:
        ids = tokenizer.encode(tokenizer.chat_prompt(args.prompt))
    else:
        ids = tokenizer.encode(args.prompt, add_bos=tokenizer.bos_id is not None)
    bucket = 1 << max(4, (len(ids) - 1).bit_length())  # next power of two: few distinct programs
    prompt_ids, prompt_mask = pad_prompts([ids], [bucket], tokenizer.pad_id)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop_ids=tuple(tokenizer.eos_ids),
        pad_id=tokenizer.pad_id,
    )
    out = generate(model, prompt_ids, prompt_mask, jax.random.key(args.seed), params)
    response = jax.device_get(out.response_ids)[0][: int(out.lengths[0])].tolist()
    print(tokenizer.decode(response, skip_special_tokens=True))
    return 0


def _convert(args) -> int:
    from pacs_jax import convert

    return convert.run(args)


def _sweep(args) -> int:
    # The sweep itself uses no JAX: each run is a `train` subprocess, which joins the other
    # hosts' processes itself when there are any.
    from pacs_jax import sweep

    return sweep.main(args.sweep_args)


def _compile(args) -> int:
    # No join_processes: compile builds programs for abstract TPU devices in this one process.
    from pacs_jax import compile_tpu

    return compile_tpu.run(args)


def _plot(args) -> int:
    from pacs_jax import plot

    return plot.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pacs_jax", description="PACS post-training for LLMs in JAX.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="run (or resume) RL training from a YAML config")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. trainer.total_steps=10")
    p.set_defaults(func=_train)

    p = commands.add_parser("eval", help="pass@k evaluation of a checkpoint or an HF model")
    from pacs_jax import evaluate_cli

    evaluate_cli.add_arguments(p)
    p.set_defaults(func=_eval)

    p = commands.add_parser("generate", help="print a completion of one prompt")
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (else sampling)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tokenizer", default="", help="tokenizer folder or .model file (default: the model folder)")
    p.add_argument("--chat-template", default="", help="Jinja chat template for tokenizers without one")
    p.set_defaults(func=_generate)

    p = commands.add_parser("convert", help="HF folder <-> Orbax checkpoint")
    from pacs_jax import convert

    convert.add_arguments(p)
    p.set_defaults(func=_convert)

    p = commands.add_parser("sweep", help="expand a grid of overrides into runs (see configs/sweeps/)", add_help=False)
    p.add_argument("sweep_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_sweep)

    p = commands.add_parser("compile", help="AOT-compile the RL step for a TPU topology on this CPU and check it fits in HBM")
    from pacs_jax import compile_tpu

    compile_tpu.add_arguments(p)
    p.set_defaults(func=_compile)

    p = commands.add_parser("plot", help="PNG curves from one or more run directories")
    from pacs_jax import plot

    plot.add_arguments(p)
    p.set_defaults(func=_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pacs_jax.config import ConfigError
    from pacs_jax.data import DataError
    from pacs_jax.models import ModelLoadError
    from pacs_jax.models.tokenizer import TokenizerError

    from pacs_jax.gcs import TRANSIENT_EXIT_STATUS, TransientIOError

    try:
        return args.func(args)
    except TransientIOError as error:
        # Not the config's fault (a 503 that outlasted its retries): a status of its own, on which
        # launch/spot_loop.sh starts the run again, where 2 stops it.
        logging.getLogger("pacs_jax").debug("transient I/O error", exc_info=True)
        print(f"error: {error}\n(a passing I/O failure: exit status {TRANSIENT_EXIT_STATUS}; starting again may succeed)",
              file=sys.stderr)
        return TRANSIENT_EXIT_STATUS
    except (ConfigError, DataError, ModelLoadError, TokenizerError, FileNotFoundError) as error:
        # Bad input (exit status 2, and only for that): one line saying what and where, not a traceback.
        logging.getLogger("pacs_jax").debug("bad input", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
