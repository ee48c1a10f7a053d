"""pass@k evaluation: score sampled responses with the verifier pool, report per data source.

The sampler is passed in (`sample_fn`), so this module holds only the evaluation maths and
the report files: `eval_metrics.json`, `eval_rollouts.jsonl` (one line per response) and
`eval_table.md` (pass@k per benchmark in paper v2's layout). `evaluate_sets` runs named sets
chunk by chunk, each chunk's results saved as it finishes, so a rerun after an interruption
samples only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import zlib
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

    result = {
        "sources": source_metrics(problem_records(examples, samples, scores, n_samples), n_samples),
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


def problem_records(examples, samples, scores, n_samples: int) -> list[dict]:
    """Per problem, what its metrics need: correct count, score sum, length sum, boxed count."""
    records = []
    for index, example in enumerate(examples):
        block = scores[index * n_samples : (index + 1) * n_samples]
        records.append({
            "source": example.source,
            "correct": int(sum(s >= CORRECT_AT for s in block)),
            "score": float(sum(block)),
            "length": int(sum(length for _, length in samples[index])),
            "boxed": int(sum(has_boxed(text) for text, _ in samples[index])),
        })
    return records


def source_metrics(records: list[dict], n_samples: int) -> dict:
    """{source: {pass@k (k = 1, 2, 4, ..., n), accuracy, response_length/mean, format_ok, n_problems,
    n_samples}} from `problem_records`."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_source[record["source"]].append(record)
    sources = {}
    for source, rows in sorted(by_source.items()):
        responses = len(rows) * n_samples
        metrics = {f"pass@{k}": sum(pass_at_k(n_samples, r["correct"], k) for r in rows) / len(rows) for k in k_values(n_samples)}
        metrics.update({
            "accuracy": sum(r["score"] for r in rows) / responses,
            "response_length/mean": sum(r["length"] for r in rows) / responses,
            "format_ok": sum(r["boxed"] for r in rows) / responses,
            "n_problems": len(rows),
            "n_samples": n_samples,
        })
        sources[source] = metrics
    return sources


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


# ------------------------------------------------------------------ resumable runs and the v2 table

# Paper v2's benchmarks, in its tables' order: (the set's name with only letters and digits, lower
# case; the column title).
V2_BENCHMARKS = (("math500", "MATH500"), ("amc23", "AMC23"), ("aime24", "AIME24"), ("aime25", "AIME25"),
                 ("beyondaime", "BeyondAIME"))
_V2_ALIASES = {"aime2024": "aime24", "aime2025": "aime25", "amc2023": "amc23", "math": "math500"}
PARTS_DIR = "parts"


class EvalResumeError(ValueError):
    """The output folder holds parts of an evaluation with other settings or other problems."""


def evaluate_sets(sets: dict, sample_fn: SampleFn, pool, n_samples: int, out_dir: str | os.PathLike, *,
                  settings: dict, chunk: int, write: bool = True, log: Callable[[str], None] = print) -> dict:
    """`evaluate` over named sets ({name: examples}), resumable: each set goes in chunks of `chunk`
    problems; a finished chunk's per-problem results and rollouts are saved under
    out_dir/parts/<set>/ before the next starts, and a rerun with the same `settings` (whatever
    changes the samples: model, sampling, seed, prompt...) loads the saved chunks instead of sampling
    them again. Each chunk samples with its own random stream (from the set's name and the chunk's
    first problem), so a resumed evaluation equals an uninterrupted one. At the end: eval_metrics.json,
    eval_rollouts.jsonl and eval_table.md in `out_dir` (only where `write`: the main process).
    Returns what `evaluate` returns, over every set."""
    if n_samples < 1 or chunk < 1:
        raise ValueError(f"n_samples and chunk must be >= 1, got {n_samples} and {chunk}")
    out_dir = Path(out_dir)
    parts = out_dir / PARTS_DIR
    settings = {**settings, "n_samples": n_samples, "chunk": chunk}
    _check_settings(parts / "settings.json", settings, write)
    records, timeouts, errors, sample_s, score_s, rollout_files = [], 0, 0, 0.0, 0.0, []
    for name, examples in sets.items():
        if not examples:
            raise ValueError(f"evaluation set {name!r} has no problems")
        done = 0
        for start in range(0, len(examples), chunk):
            part = parts / _safe_name(name) / f"{start:06d}.json"
            problems = [_fingerprint(e) for e in examples[start : start + chunk]]
            saved = _read_part(part, problems)
            if saved is None:
                saved = _run_chunk(examples[start : start + chunk], sample_fn, pool, n_samples, zlib.crc32(f"{name}:{start}".encode()),
                                   problems, part, write)
            else:
                done += len(problems)
            records += saved["records"]
            timeouts += saved["reward/timeouts"]
            errors += saved["reward/errors"]
            sample_s += saved["time/sample_s"]
            score_s += saved["time/score_s"]
            rollout_files.append(part.with_suffix(".rollouts.jsonl"))
        log(f"{name}: {len(examples)} problems x {n_samples} samples" + (f" ({done} loaded from {parts})" if done else ""))
    result = {"sources": source_metrics(records, n_samples), "reward/timeouts": timeouts, "reward/errors": errors,
              "time/sample_s": sample_s, "time/score_s": score_s}
    if write:
        _write_json(out_dir / "eval_metrics.json", result)
        tmp = out_dir / "eval_rollouts.jsonl.tmp"
        with tmp.open("wb") as out:
            for path in rollout_files:
                out.write(path.read_bytes())
        tmp.replace(out_dir / "eval_rollouts.jsonl")
        (out_dir / "eval_table.md").write_text(v2_table(result["sources"], n_samples, list(sets)))
    return result


def _run_chunk(examples, sample_fn, pool, n_samples, stream, problems, part: Path, write: bool) -> dict:
    start = time.monotonic()
    samples = sample_fn(examples, n_samples, stream=stream)
    _check_samples(samples, examples, n_samples)
    sampled = time.monotonic()
    scores, stats = pool.score_batch([t for per in samples for t, _ in per], [e.answer for e in examples for _ in range(n_samples)])
    saved = {"problems": problems, "records": problem_records(examples, samples, scores, n_samples),
             "reward/timeouts": stats["reward/timeouts"], "reward/errors": stats["reward/errors"],
             "time/sample_s": sampled - start, "time/score_s": time.monotonic() - sampled}
    if write:
        # The rollouts first, then the part that lists the chunk as done.
        write_rollouts(part.with_suffix(".rollouts.jsonl"), examples, samples, scores, n_samples)
        _write_json(part, saved)
    return saved


def _check_settings(path: Path, settings: dict, write: bool) -> None:
    settings = json.loads(json.dumps(settings, sort_keys=True))
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != settings:
            changed = sorted(k for k in {*saved, *settings} if saved.get(k) != settings.get(k))
            raise EvalResumeError(
                f"{path.parent} holds an evaluation with other settings ({', '.join(changed)}: "
                f"{[saved.get(k) for k in changed]} there, {[settings.get(k) for k in changed]} now); "
                f"pass another --out, or delete {path.parent} to start this one over"
            )
    elif write:
        _write_json(path, settings)


def _read_part(part: Path, problems: list[str]) -> Optional[dict]:
    """A chunk's saved results, or None if it has not finished (or its rollouts are missing)."""
    if not part.is_file() or not part.with_suffix(".rollouts.jsonl").is_file():
        return None
    saved = json.loads(part.read_text())
    if saved.get("problems") != problems:
        raise EvalResumeError(f"{part} was evaluated on other problems (the data set changed); delete "
                              f"{part.parent.parent} to start over, or pass another --out")
    return saved


def _fingerprint(example) -> str:
    return hashlib.sha1(f"{example.prompt_text}\x00{example.answer}".encode()).hexdigest()[:16]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _write_json(path: Path, value) -> None:
    """Written to a temporary name first, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def v2_title(name: str) -> str:
    """A set's column title: paper v2's spelling for its five benchmarks (aime2024 -> AIME24), else the name."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = _V2_ALIASES.get(key, key)
    return dict(V2_BENCHMARKS).get(key, name)


def v2_table(sources: dict, n_samples: int, order: Sequence[str] = ()) -> str:
    """pass@k in percent, one row per k and one column per set, v2's benchmarks first in its order
    (MATH500, AMC23, AIME24, AIME25, BeyondAIME), then the others, then the average over the columns."""
    titles = [v for _, v in V2_BENCHMARKS]
    names = sorted(sources, key=lambda s: (titles.index(v2_title(s)) if v2_title(s) in titles else len(titles),
                                           list(order).index(s) if s in order else 0, s))
    header = [v2_title(s) for s in names] + ["Avg"]
    lines = [f"pass@k (%), n = {n_samples} samples per problem, unbiased estimator; Avg over the {len(names)} sets shown",
             "", "| | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for k in k_values(n_samples):
        values = [100 * sources[s][f"pass@{k}"] for s in names]
        cells = [f"{v:.2f}" for v in values] + [f"{sum(values) / len(values):.2f}"]
        lines.append(f"| pass@{k} | " + " | ".join(cells) + " |")
    lines.append("| problems | " + " | ".join(str(sources[s]["n_problems"]) for s in names) + " | |")
    return "\n".join(lines) + "\n"
