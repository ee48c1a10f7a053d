"""Benchmark the reward pool: maths checks per second with 1 and 2 workers on MATH-500 answers
(gold, worked solutions and perturbed answers), and latency when adversarial items are mixed in.

    python bench/rewards.py [--n 5000] [--workers 1,2] [--timeout 5] [--out bench/out/rewards.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pacs_jax.rewards.pool import VerifierPool  # noqa: E402

ADVERSARIAL = {
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",
    "huge_power": "\\boxed{10^{10^{10}}}",
    "huge_factorial": "\\boxed{(10^{10})!}",
    "factorial_100000": "\\boxed{100000!}",
    "nested_braces_100kB": "\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}",
    "nested_braces_400": "\\boxed{" + "{" * 400 + "7" + "}" * 400 + "}",
    "invalid_latex": "\\boxed{\\frac{1}{\\sqrt{}}^^_\\left(}",
    "empty": "",
}


def _math500_rows() -> tuple[list[dict], str]:
    for path in (REPO.parent / "shared" / "data" / "math500" / "test.jsonl", REPO / "tests" / "data" / "math500_test_50.jsonl"):
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines()], str(path)
    raise SystemExit("no MATH-500 file found (../shared/data/math500/test.jsonl or tests/data/)")


def _workload(rows: list[dict], n: int) -> tuple[list[str], list[str], list[str]]:
    """n (response, truth, kind) triples cycling through rows: half gold, a quarter the worked
    solution, a quarter a perturbed answer."""
    responses, truths, kinds = [], [], []
    for i in range(n):
        row = rows[i % len(rows)]
        kind = ("gold", "solution", "gold", "perturbed")[i % 4]
        if kind == "gold":
            text = f"So the answer is $\\boxed{{{row['answer']}}}$."
        elif kind == "solution":
            text = row["solution"]
        else:
            text = f"So the answer is $\\boxed{{{row['answer']}+1}}$."
        responses.append(text)
        truths.append(row["answer"])
        kinds.append(kind)
    return responses, truths, kinds


def _accuracy(scores: list[float], kinds: list[str], kind: str) -> float:
    picked = [s for s, k in zip(scores, kinds) if k == kind]
    return sum(picked) / len(picked) if picked else float("nan")


def bench_throughput(workers: int, responses, truths, kinds, timeout_s: float) -> dict:
    start = time.monotonic()
    with VerifierPool("math", workers=workers, timeout_s=timeout_s, deadline_s=3600.0) as pool:
        pool.score_batch(["\\boxed{1}"] * workers, ["1"] * workers)  # every worker up
        ready = time.monotonic()
        scores, stats = pool.score_batch(responses, truths)
        elapsed = time.monotonic() - ready
    return {
        "workers": workers,
        "checks": len(responses),
        "startup_s": ready - start,
        "score_s": elapsed,
        "checks_per_s": len(responses) / elapsed,
        "accuracy_gold": _accuracy(scores, kinds, "gold"),
        "accuracy_solution": _accuracy(scores, kinds, "solution"),
        "accuracy_perturbed": _accuracy(scores, kinds, "perturbed"),
        "timeouts": stats["reward/timeouts"],
        "errors": stats["reward/errors"],
    }


def bench_adversarial(workers: int, responses, truths, timeout_s: float) -> dict:
    with VerifierPool("math", workers=workers, timeout_s=timeout_s, deadline_s=3600.0) as pool:
        pool.score_batch(["\\boxed{1}"] * workers, ["1"] * workers)
        single = {}
        for name, text in ADVERSARIAL.items():
            start = time.monotonic()
            scores, stats = pool.score_batch([text], ["81"])
            single[name] = {
                "latency_s": time.monotonic() - start,
                "score": scores[0],
                "timeout": stats["reward/timeouts"] > 0,
                "worker_restarted": stats["reward/worker_restarts"] > 0,
            }
        start = time.monotonic()
        clean_scores, _ = pool.score_batch(responses, truths)
        clean_s = time.monotonic() - start
        # One adversarial item after every 50 ordinary ones.
        mixed_responses, mixed_truths, ordinary = [], [], []
        adversarial = list(ADVERSARIAL.values())
        for i, (text, truth) in enumerate(zip(responses, truths)):
            ordinary.append(len(mixed_responses))
            mixed_responses.append(text)
            mixed_truths.append(truth)
            if i % 50 == 49:
                mixed_responses.append(adversarial[(i // 50) % len(adversarial)])
                mixed_truths.append("81")
        start = time.monotonic()
        mixed_scores, stats = pool.score_batch(mixed_responses, mixed_truths)
        mixed_s = time.monotonic() - start
    return {
        "workers": workers,
        "timeout_s": timeout_s,
        "single_item": single,
        "worst_single_latency_s": max(item["latency_s"] for item in single.values()),
        "clean_batch": {"items": len(responses), "seconds": clean_s},
        "mixed_batch": {
            "items": len(mixed_responses),
            "adversarial_items": len(mixed_responses) - len(responses),
            "seconds": mixed_s,
            "timeouts": stats["reward/timeouts"],
            "errors": stats["reward/errors"],
            "worker_restarts": stats["reward/worker_restarts"],
            "ordinary_scores_unchanged": [mixed_scores[i] for i in ordinary] == clean_scores,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="checks per throughput run")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-item time limit (reward.timeout_s)")
    parser.add_argument("--adversarial-n", type=int, default=500, help="ordinary items in the mixed batch")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "rewards.json"))
    args = parser.parse_args()

    rows, data_path = _math500_rows()
    responses, truths, kinds = _workload(rows, args.n)
    worker_counts = [int(w) for w in args.workers.split(",")]
    report = {
        "benchmark": "rewards",
        "data": data_path,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "throughput": [],
    }
    for workers in worker_counts:
        result = bench_throughput(workers, responses, truths, kinds, args.timeout)
        print(json.dumps(result), flush=True)
        report["throughput"].append(result)
    adv_responses, adv_truths, _ = _workload(rows, min(args.adversarial_n, args.n))
    report["adversarial"] = bench_adversarial(max(worker_counts), adv_responses, adv_truths, args.timeout)
    print(json.dumps({k: v for k, v in report["adversarial"].items() if k != "single_item"}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
