"""`python -m pacs_jax convert`: Hugging Face folder <-> Orbax checkpoint, and training runs -> HF.

An Orbax model folder holds `params/` (the decoder's parameters as an Orbax pytree), the source's
`config.json` (the architecture) and its tokenizer files, so it converts back without the original.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from flax import nnx


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", help="Hugging Face folder (config.json + safetensors)")
    source.add_argument("--from-orbax", help="Orbax model folder written by --to-orbax")
    source.add_argument("--from-run", help="a training run directory (reads its config.yaml and checkpoints)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--to-hf", help="write a Hugging Face folder here")
    target.add_argument("--to-orbax", help="write an Orbax model folder here")
    parser.add_argument("--step", type=int, default=None, help="with --from-run: checkpoint step (default: latest)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def hf_to_orbax(hf_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    from pacs_jax.checkpoint import save_pytree
    from pacs_jax.models import from_pretrained

    out = Path(out_dir)
    model = from_pretrained(hf_dir, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_pytree(out.resolve() / "params", nnx.to_pure_dict(nnx.state(model, nnx.Param)), overwrite=True)
    _copy_side_files(Path(hf_dir), out)
    return out


def orbax_to_hf(orbax_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    from pacs_jax.checkpoint import load_pytree
    from pacs_jax.models import DecoderConfig, build_decoder, read_hf_config, save_pretrained
    from pacs_jax.models.llama import Decoder

    source = Path(orbax_dir)
    config = DecoderConfig.from_hf(read_hf_config(source), source=str(source / "config.json"), param_dtype=dtype, compute_dtype=dtype)
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    params = load_pytree(source.resolve() / "params", nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    save_pretrained(build_decoder(config, params), out_dir)
    _copy_side_files(source, Path(out_dir))
    return Path(out_dir)


def run_to_hf(run_dir: str | Path, out_dir: str, step: int | None = None) -> str:
    """A training run's policy (its latest checkpoint, or `step`) as an HF folder (`out_dir` may be
    gs://), on this machine's CPU: the checkpoint's policy alone is read into host memory, whatever
    slice wrote it. Needs the run's model (model.path's config.json, or model.arch) to know the
    architecture."""
    import jax

    from pacs_jax.config import load_config
    from pacs_jax.policy import export_hf, restore_policy

    config = load_config(str(Path(run_dir) / "config.yaml"))
    checkpoint_dir = run_checkpoint_dir(run_dir, config.trainer.run_dir, config.trainer.checkpoint_dir)
    policy, _ = restore_policy(config, checkpoint_dir, step, placement=jax.devices("cpu")[0])
    return export_hf(policy, str(out_dir), config.model.tokenizer or config.model.path)


def run_checkpoint_dir(run_dir: str | Path, configured_run_dir: str, checkpoint_dir: str) -> str:
    """Where a run's checkpoints are, seen from here. A relative trainer.checkpoint_dir was relative
    to the directory training ran in: found from where `run_dir` is (trainer.run_dir, when relative,
    is the same path from that directory), else relative to the run directory itself."""
    run = Path(run_dir).expanduser().resolve()
    if not checkpoint_dir:
        return str(run / "checkpoints")
    if "://" in checkpoint_dir or Path(checkpoint_dir).expanduser().is_absolute():
        return checkpoint_dir
    candidates = []
    configured = Path(configured_run_dir)
    if "://" not in configured_run_dir and not configured.is_absolute() and configured.parts:
        depth = len(configured.parts)
        if run.parts[-depth:] == Path(*configured.parts).parts and len(run.parts) > depth:
            candidates.append(Path(*run.parts[:-depth]) / checkpoint_dir)  # the directory training ran in
    candidates.append(run / checkpoint_dir)
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate)
    raise FileNotFoundError(f"trainer.checkpoint_dir={checkpoint_dir} of {run_dir}/config.yaml is not at "
                            f"{' or '.join(str(c) for c in candidates)}")


def _copy_side_files(source: Path, target: Path) -> None:
    """config.json, tokenizer and generation files: everything but the weights."""
    for item in source.iterdir():
        if item.is_file() and item.suffix not in (".safetensors", ".bin") and item.name != "model.safetensors.index.json":
            if item.name == "config.json" and (target / "config.json").exists():
                continue  # save_pretrained wrote the authoritative one
            shutil.copy2(item, target / item.name)


def run(args: argparse.Namespace) -> int:
    from pacs_jax.config import ConfigError

    if args.from_hf and args.to_hf or args.from_orbax and args.to_orbax:
        raise ConfigError("convert between different formats: --from-hf with --to-orbax, --from-orbax/--from-run with --to-hf")
    if args.from_run and args.to_orbax:
        raise ConfigError("--from-run converts to --to-hf; a run's checkpoints are already Orbax")
    if args.from_hf:
        out = hf_to_orbax(args.from_hf, args.to_orbax, args.dtype)
    elif args.from_orbax:
        if not (Path(args.from_orbax) / "params").is_dir():
            raise FileNotFoundError(f"{args.from_orbax} has no params/ folder: not written by convert --to-orbax")
        out = orbax_to_hf(args.from_orbax, args.to_hf, args.dtype)
    else:
        out = run_to_hf(args.from_run, args.to_hf, args.step)
    print(f"wrote {out}")
    return 0


__all__ = ["hf_to_orbax", "orbax_to_hf", "run_to_hf"]
