"""Our miniature of the paper's comparison: PACS (beta 1 and 2, with and without the "question"
weights), GRPO and PPO on the CPU debug task, with the same budget and seeds.

Each seed's SFT warm-up runs once (a run with total_steps=0 that exports the warmed-up policy as
an HF folder); every algorithm then starts from that same policy (`model.path`, `sft.steps=0`), so
runs with the same seed differ only in the algorithm. Writes, under --out:
  runs/<variant>/seed<k>/     the run directories
  compare.json                per run: final reward, steps to 50%, wall time; per variant: means
  compare.md                  the table
  compare.png                 mean reward curve per variant (10-step moving average)

    python bench/compare_algorithms.py                     # 6 variants x 3 seeds (about an hour on 2 cores)
    python bench/compare_algorithms.py --seeds 0 --steps 40 --variants pacs_b1,grpo   # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "pacs_b1": ["algorithm.name=pacs", "algorithm.beta=1.0", "algorithm.weight_mode=question"],
    "pacs_b2": ["algorithm.name=pacs", "algorithm.beta=2.0", "algorithm.weight_mode=question"],
    "pacs_b1_noweight": ["algorithm.name=pacs", "algorithm.beta=1.0", "algorithm.weight_mode=null"],
    "pacs_b2_noweight": ["algorithm.name=pacs", "algorithm.beta=2.0", "algorithm.weight_mode=null"],
    "grpo": ["algorithm.name=grpo"],
    "ppo": ["algorithm.name=ppo"],
}
WINDOW = 10


def moving_average(values: list[float], window: int = WINDOW) -> np.ndarray:
    values = np.asarray(values, float)
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def summarize_run(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [r["reward/mean"] for r in records]
    smooth = moving_average(rewards)
    reached = np.nonzero(smooth >= 0.5)[0]
    return {
        "steps": len(records),
        "first_reward": float(np.mean(rewards[:WINDOW])),
        "final_reward": float(np.mean(rewards[-WINDOW:])),
        "steps_to_50pct": int(reached[0]) + 1 if len(reached) else None,
        "wall_s": float(sum(r.get("time/step_s", 0.0) for r in records)),
        "curve": smooth.tolist(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=150, help="RL steps per run (the same budget for all)")
    parser.add_argument("--config", default=str(REPO / "configs" / "debug_cpu.yaml"))
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "compare"))
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    results: dict[str, dict[int, dict]] = {}
    warmed_up = {}
    for seed in seeds:
        sft_dir = out / "runs" / "sft" / f"seed{seed}"
        warmed_up[seed] = sft_dir / "policy"
        if not (warmed_up[seed] / "config.json").exists():
            print(f"[sft seed {seed}] warm-up", flush=True)
            subprocess.run([
                sys.executable, "-m", "pacs_jax", "train", "--config", args.config, f"trainer.seed={seed}",
                "trainer.total_steps=0", f"trainer.run_dir={sft_dir}", "trainer.eval_every=0",
                f"trainer.export_hf={warmed_up[seed]}", *args.overrides,
            ], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    for variant in variants:
        for seed in seeds:
            run_dir = out / "runs" / variant / f"seed{seed}"
            command = [
                sys.executable, "-m", "pacs_jax", "train", "--config", args.config, *VARIANTS[variant],
                f"trainer.seed={seed}", f"trainer.total_steps={args.steps}", f"trainer.run_dir={run_dir}",
                "trainer.eval_every=0", f"trainer.save_every={args.steps}", f"model.path={warmed_up[seed]}",
                "model.tokenizer=char", "sft.steps=0", *args.overrides,
            ]
            if not (run_dir / "DONE").exists():
                print(f"[{variant} seed {seed}] {' '.join(command[3:])}", flush=True)
                started = time.time()
                subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
                print(f"[{variant} seed {seed}] done in {time.time() - started:.0f} s", flush=True)
            results.setdefault(variant, {})[seed] = summarize_run(run_dir)

    table = {}
    for variant, per_seed in results.items():
        runs = list(per_seed.values())
        reached = [r["steps_to_50pct"] for r in runs if r["steps_to_50pct"] is not None]
        table[variant] = {
            "final_reward_mean": float(np.mean([r["final_reward"] for r in runs])),
            "final_reward_std": float(np.std([r["final_reward"] for r in runs])),
            "first_reward_mean": float(np.mean([r["first_reward"] for r in runs])),
            "steps_to_50pct_mean": float(np.mean(reached)) if reached else None,
            "runs_reaching_50pct": f"{len(reached)}/{len(runs)}",
            "wall_s_mean": float(np.mean([r["wall_s"] for r in runs])),
        }
    out.mkdir(parents=True, exist_ok=True)
    report = {"steps": args.steps, "seeds": seeds, "overrides": args.overrides, "variants": table, "runs": results}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"RL steps per run: {args.steps}; seeds: {seeds}; reward = mean over the first / last {WINDOW} steps",
        "",
        "| variant | first reward | final reward (mean ± std) | steps to 50% (mean) | runs reaching 50% | wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, row in table.items():
        to50 = "-" if row["steps_to_50pct_mean"] is None else f"{row['steps_to_50pct_mean']:.0f}"
        lines.append(
            f"| {variant} | {row['first_reward_mean']:.3f} | {row['final_reward_mean']:.3f} ± {row['final_reward_std']:.3f} "
            f"| {to50} | {row['runs_reaching_50pct']} | {row['wall_s_mean']:.0f} |"
        )
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for variant, per_seed in results.items():
        curves = [r["curve"] for r in per_seed.values()]
        length = min(len(c) for c in curves)
        axes.plot(np.arange(1, length + 1), np.mean([c[:length] for c in curves], axis=0), label=variant)
    axes.set_xlabel("RL step")
    axes.set_ylabel(f"reward ({WINDOW}-step moving average, mean over seeds)")
    axes.set_title("debug task: PACS vs baselines")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(out / "compare.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
