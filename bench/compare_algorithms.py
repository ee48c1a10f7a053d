"""Our miniature of the paper's comparison: PACS (beta 1 and 2), GRPO, PPO, RLOO, DAPO and GSPO on
the CPU debug task (PACS without the "question" weights on request), with the same budget and seeds.

Each seed's SFT warm-up runs once (a run with total_steps=0 that exports the warmed-up policy as
an HF folder); every algorithm then starts from that same policy (`model.path`, `sft.steps=0`), so
runs with the same seed differ only in the algorithm. Writes, under --out:
  runs/<variant>/seed<k>/     the run directories
  compare.json                per run: first / final reward, held-out pass@1 before / after, steps
                              to 50% and 80%, wall time; per variant: mean, std, count; the verdicts
  compare.md                  the table, and each variant against the first one, a difference
                              called only where it exceeds two standard errors
  compare.png                 mean reward curve per variant (10-step moving average, ± 1 s.e.)

    python bench/compare_algorithms.py                     # 7 variants x 3 seeds, the config's steps
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
    "grpo": ["algorithm.name=grpo"],
    "ppo": ["algorithm.name=ppo"],
    "rloo": ["algorithm.name=rloo"],
    # configs/debug_cpu_dapo.yaml's settings: clip-higher, dual clip at 10, the soft overlong
    # punishment (a 4-token buffer before a 16-token cap) and dynamic sampling.
    "dapo": ["algorithm.name=grpo", "algorithm.clip_high=0.28", "algorithm.clip_ratio_c=10.0", "reward.overlong_buffer=4",
             "rollout.max_new_tokens=16", "trainer.dynamic_sampling=true"],
    # configs/debug_cpu_gspo.yaml's: the GSPO paper's clip range on its sequence-level ratio.
    "gspo": ["algorithm.name=gspo", "algorithm.clip_low=3.0e-4", "algorithm.clip_high=4.0e-4",
             "algorithm.loss_agg_mode=seq-mean-token-mean"],
    "pacs_b1_noweight": ["algorithm.name=pacs", "algorithm.beta=1.0", "algorithm.weight_mode=null"],
    "pacs_b2_noweight": ["algorithm.name=pacs", "algorithm.beta=2.0", "algorithm.weight_mode=null"],
}
DEFAULT_VARIANTS = ("pacs_b1", "pacs_b2", "grpo", "ppo", "rloo", "dapo", "gspo")
WINDOW = 10
THRESHOLDS = (0.5, 0.8)


def moving_average(values: list[float], window: int = WINDOW) -> np.ndarray:
    values = np.asarray(values, float)
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def summarize_run(run_dir: Path) -> dict:
    """One run's numbers: sampled reward over the first / last WINDOW steps, the first step whose
    WINDOW-step moving average reaches 50% / 80%, held-out pass@1 before and after, wall time."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    training = [r for r in records if "reward/mean" in r]
    rewards = [r["reward/mean"] for r in training]
    smooth = moving_average(rewards)
    held_out = {r["step"]: v for r in records for k, v in r.items() if k.startswith("val/") and k.endswith("/pass@1")}
    summary = {
        "steps": len(training),
        "first_reward": float(np.mean(rewards[:WINDOW])),
        "final_reward": float(np.mean(rewards[-WINDOW:])),
        "val_start": held_out.get(0),
        "val_final": held_out.get(training[-1]["step"]) if training else None,
        "wall_s": float(sum(r.get("time/step_s", 0.0) for r in training)),
        "curve": smooth.tolist(),
    }
    for threshold in THRESHOLDS:
        reached = np.nonzero(smooth >= threshold)[0]
        summary[f"steps_to_{int(threshold * 100)}pct"] = int(reached[0]) + 1 if len(reached) else None
    return summary


def mean_std(values: list) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, len(values)


def differs(a: dict, b: dict, key: str) -> str:
    """'higher' / 'lower' when a's mean differs from b's by more than two standard errors of the
    difference (sqrt(sa^2/na + sb^2/nb), sample standard deviations), else 'no difference'."""
    (ma, sa, na), (mb, sb, nb) = a[key], b[key]
    if ma is None or mb is None or na < 2 or nb < 2:
        return "n/a"
    se = float(np.sqrt(sa**2 / na + sb**2 / nb))
    if abs(ma - mb) <= 2 * se:
        return "no difference"
    return "higher" if ma > mb else "lower"


def _fmt(entry, digits: int = 3) -> str:
    mean, std, n = entry
    return "-" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=0, help="RL steps per run, the same for all (0 = the config's trainer.total_steps)")
    parser.add_argument("--config", default=str(REPO / "configs" / "debug_cpu.yaml"))
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "compare"))
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.steps:
        sys.path.insert(0, str(REPO))
        from pacs_jax.config import load_config

        args.steps = load_config(args.config, args.overrides).trainer.total_steps
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
                "trainer.total_steps=0", f"trainer.run_dir={sft_dir}", "trainer.eval_every=0", "trainer.val_before_train=false",
                "trainer.dump_rollouts_every=0", f"trainer.export_hf={warmed_up[seed]}", *args.overrides,
            ], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    for variant in variants:
        for seed in seeds:
            run_dir = out / "runs" / variant / f"seed{seed}"
            # Held-out validation (the config's data.val and trainer.val_sampling) before the first
            # RL step and after the last one.
            command = [
                sys.executable, "-m", "pacs_jax", "train", "--config", args.config, *VARIANTS[variant],
                f"trainer.seed={seed}", f"trainer.total_steps={args.steps}", f"trainer.run_dir={run_dir}",
                "trainer.val_before_train=true", f"trainer.eval_every={args.steps}", f"trainer.save_every={args.steps}",
                "trainer.dump_rollouts_every=0", f"model.path={warmed_up[seed]}", "model.tokenizer=char", "sft.steps=0",
                *args.overrides,
            ]
            if not (run_dir / "DONE").exists():
                print(f"[{variant} seed {seed}] {' '.join(command[3:])}", flush=True)
                started = time.time()
                subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
                print(f"[{variant} seed {seed}] done in {time.time() - started:.0f} s", flush=True)
            results.setdefault(variant, {})[seed] = summarize_run(run_dir)

    keys = ("first_reward", "final_reward", "val_start", "val_final", "steps_to_50pct", "steps_to_80pct", "wall_s")
    table = {}
    for variant, per_seed in results.items():
        runs = list(per_seed.values())
        table[variant] = {key: mean_std([r[key] for r in runs]) for key in keys}
        table[variant]["runs"] = len(runs)
    reference = variants[0]
    comparisons = {
        variant: {key: differs(table[variant], table[reference], key) for key in ("final_reward", "val_final")}
        for variant in table if variant != reference
    }
    out.mkdir(parents=True, exist_ok=True)
    report = {"steps": args.steps, "seeds": seeds, "overrides": args.overrides, "variants": table,
              f"vs_{reference}": comparisons, "runs": results}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"RL steps per run: {args.steps}; seeds: {seeds}; mean ± sample std over seeds; reward = sampled training "
        f"reward, mean over the first / last {WINDOW} steps; held-out = validation pass@1 before the first and "
        f"after the last RL step; steps to X% = first step whose {WINDOW}-step moving average reaches X% "
        f"(mean over the runs that reach it, count in brackets); wall time = sum of the RL steps' time/step_s.",
        "",
        "| variant | first reward | final reward | held-out before | held-out after | steps to 50% | steps to 80% | wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, row in table.items():
        reach = [f"{_fmt(row[k], 0)} ({row[k][2]}/{row['runs']})" for k in ("steps_to_50pct", "steps_to_80pct")]
        lines.append(
            f"| {variant} | {_fmt(row['first_reward'])} | {_fmt(row['final_reward'])} | {_fmt(row['val_start'])} "
            f"| {_fmt(row['val_final'])} | {reach[0]} | {reach[1]} | {_fmt(row['wall_s'], 0)} |"
        )
    lines += ["", f"Against {reference} (a difference is called only where it exceeds two standard errors):", ""]
    for variant, verdict in comparisons.items():
        lines.append(f"- {variant}: final reward {verdict['final_reward']}, held-out after {verdict['val_final']}")
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
        stacked = np.asarray([c[:length] for c in curves])
        mean = stacked.mean(axis=0)
        steps = np.arange(1, length + 1)
        line, = axes.plot(steps, mean, label=f"{variant} (n={len(curves)})")
        if len(curves) > 1:
            se = stacked.std(axis=0, ddof=1) / np.sqrt(len(curves))
            axes.fill_between(steps, mean - se, mean + se, color=line.get_color(), alpha=0.2)
    axes.set_xlabel("RL step")
    axes.set_ylabel(f"sampled reward ({WINDOW}-step moving average)")
    axes.set_title("debug task: mean over seeds, band = ± 1 standard error")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(out / "compare.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / 'compare.md'}, {out / 'compare.json'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
