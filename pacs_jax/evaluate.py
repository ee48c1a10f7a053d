"""pass@k evaluation: score sampled responses with the verifier pool, report per data source.

The sampler is passed in (`sample_fn`), so this module holds only the evaluation maths and
the report files: `eval_metrics.json` and `eval_rollouts.jsonl` (one line per response).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional, Sequence

from pacs_jax.rewards.math import has_boxed

# sample_fn(examples, n_samples) -> per example, n_samples (response_text, response_length_tokens).
SampleFn = Callable[[Sequence, int], list[list[tuple[str, int]]]]
# A response whose score reaches this counts as correct for pass@k (verifiers give 0 or 1).
CORRECT_AT = 0.5


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    failure = 1.0
    for i in range(n - c + 1, n + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure


def k_values(n: int) -> list[int]:
    """Powers of two up to n, and n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks if ks[-1] == n else ks + [n]


def _check_samples(samples, examples, n_samples: int) -> None:
    if len(samples) != len(examples):
        raise ValueError(f"sample_fn returned {len(samples)} lists for {len(examples)} examples")
    for index, responses in enumerate(samples):
        if len(responses) != n_samples:
            raise ValueError(f"sample_fn returned {len(responses)} responses for example {index}, expected {n_samples}")


def evaluate(
    examples: Sequence,
    sample_fn: SampleFn,
    pool,
    n_samples: int,
    out_dir: Optional[str | os.PathLike] = None,
    rollouts_path: Optional[str | os.PathLike] = None,
    **rollout_fields,
) -> dict:
    """Sample `n_samples` responses per example, score them with `pool` (a VerifierPool), and
    return {"sources": {source: {pass@k..., accuracy, response_length/mean, format_ok, ...}},
    "reward/timeouts", "reward/errors", "time/sample_s", "time/score_s"}; with `out_dir`,
    also write eval_metrics.json and eval_rollouts.jsonl there; with `rollouts_path`, only the
    rollouts, to that file, each line also holding `rollout_fields` (e.g. step=50)."""
    if n_samples < 1:
        raise ValueError(f"n_samples (trainer.eval_samples) must be >= 1, got {n_samples}")
    if not examples:
        raise ValueError("evaluate needs at least one example")
    start = time.monotonic()
    samples = sample_fn(examples, n_samples)
    _check_samples(samples, examples, n_samples)
    sampled = time.monotonic()
    responses = [text for per_example in samples for text, _ in per_example]
    truths = [example.answer for example in examples for _ in range(n_samples)]
    scores, stats = pool.score_batch(responses, truths)
    scored = time.monotonic()

    by_source: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        by_source[example.source].append(index)
    sources = {}
    for source, indices in sorted(by_source.items()):
        correct, lengths, formatted, total_score = [], [], [], 0.0
        for index in indices:
            block = scores[index * n_samples : (index + 1) * n_samples]
            correct.append(sum(s >= CORRECT_AT for s in block))
            total_score += sum(block)
            lengths.extend(length for _, length in samples[index])
            formatted.extend(has_boxed(text) for text, _ in samples[index])
        metrics = {f"pass@{k}": sum(pass_at_k(n_samples, c, k) for c in correct) / len(indices) for k in k_values(n_samples)}
        metrics.update({
            "accuracy": total_score / (len(indices) * n_samples),
            "response_length/mean": sum(lengths) / len(lengths),
            "format_ok": sum(formatted) / len(formatted),
            "n_problems": len(indices),
            "n_samples": n_samples,
        })
        sources[source] = metrics
    result = {
        "sources": sources,
        "reward/timeouts": stats["reward/timeouts"],
        "reward/errors": stats["reward/errors"],
        "time/sample_s": sampled - start,
        "time/score_s": scored - sampled,
    }
    if out_dir is not None:
        _write_reports(Path(out_dir), result, examples, samples, scores, n_samples)
    if rollouts_path is not None:
        write_rollouts(rollouts_path, examples, samples, scores, n_samples, **rollout_fields)
    return result


def flatten_metrics(result: dict, prefix: str = "eval/") -> dict[str, float]:
    """{"eval/math500/pass@1": ..., "eval/reward/timeouts": ...} for the training metrics log."""
    flat = {f"{prefix}{source}/{key}": float(value) for source, metrics in result["sources"].items() for key, value in metrics.items()}
    flat.update({f"{prefix}{key}": float(value) for key, value in result.items() if key != "sources"})
    return flat


def _write_reports(out_dir: Path, result: dict, examples, samples, scores, n_samples: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written to a temporary name first, so a reader never sees a half-written file.
    metrics_path = out_dir / "eval_metrics.json"
    tmp = metrics_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(metrics_path)
    write_rollouts(out_dir / "eval_rollouts.jsonl", examples, samples, scores, n_samples)


def write_rollouts(path: str | os.PathLike, examples, samples, scores, n_samples: int, **fields) -> None:
    """One JSON line per response: `fields` (e.g. the training step), source, problem, prompt,
    answer, sample index, response, response_length, score. `samples[i]` holds example i's
    `n_samples` (text, length) pairs and `scores` is flat, example-major."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written to a temporary name first, so a reader never sees a half-written file.
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for index, example in enumerate(examples):
            for sample, (text, length) in enumerate(samples[index]):
                line = {
                    **fields,
                    "source": example.source,
                    "problem": example.problem,
                    "prompt": example.prompt_text,
                    "answer": example.answer,
                    "sample": sample,
                    "response": text,
                    "response_length": int(length),
                    "score": float(scores[index * n_samples + sample]),
                }
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(path)
