"""Training curves as PNG files from the metrics.jsonl of one or more runs, overlaid.

Uses matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch).
CLI: `python -m pacs_jax plot RUN_DIR [RUN_DIR ...] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pacs_jax.metrics_log import read_metrics

# (file stem, metrics key, y-axis label); a plot is written when any run has the key.
CURVES = (
    ("reward", "reward/mean", "mean reward"),
    ("response_length", "response_length/mean", "mean response length (tokens)"),
    ("loss", "loss", "loss"),
    ("critic_accuracy", "pacs/critic_accuracy", "critic accuracy"),
    ("grad_norm", "grad_norm", "gradient norm"),
)


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Legend labels: each directory's name, or its full path where names collide."""
    names = [path.name for path in run_dirs]
    return [str(path) if names.count(path.name) > 1 else path.name for path in run_dirs]


def curve(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`; non-finite values become NaN, which matplotlib leaves as gaps."""
    points = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], (int, float))]
    points.sort()
    steps = [step for step, _ in points]
    values = [value if math.isfinite(value) else math.nan for _, value in points]
    return steps, values


def plot_runs(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> list[Path]:
    """Write one PNG per curve in CURVES that at least one run logged; return their paths."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    runs = list(zip(run_labels(run_dirs), [read_metrics(d) for d in run_dirs]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, key, label in CURVES:
        curves = [(name, *curve(records, key)) for name, records in runs]
        curves = [(name, steps, values) for name, steps, values in curves if steps]
        if not curves:
            continue
        figure = Figure(figsize=(7, 4.5), dpi=120)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for name, steps, values in curves:
            axes.plot(steps, values, label=name, marker="." if len(steps) <= 50 else None)
        if key == "reward/mean":
            # The held-out validation pass@1 (val/<set>/pass@1) on the same axes, as points.
            for name, records in runs:
                for val_key in sorted({k for r in records for k in r if k.startswith("val/") and k.endswith("/pass@1")}):
                    steps, values = curve(records, val_key)
                    axes.plot(steps, values, "o--", label=f"{name}: held-out {val_key.split('/')[1]} pass@1")
        axes.set_xlabel("step")
        axes.set_ylabel(label)
        axes.set_title(key)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        path = out_dir / f"{stem}.png"
        figure.savefig(path)
        written.append(path)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default="plots", help="folder for the PNG files (default: plots)")


def run(args: argparse.Namespace) -> int:
    paths = plot_runs(args.run_dirs, args.out)
    for path in paths:
        print(path)
    if not paths:
        print(f"no known metric ({', '.join(key for _, key, _ in CURVES)}) in {args.run_dirs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacs_jax plot", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
