"""Evaluation: pass@k against brute-force subset enumeration and exact rationals, and the full
evaluate() report on real MATH-500 / GSM8K answers scored by the real verifier pool."""

import itertools
import json
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from pacs_jax.data import Example, load_rows
from pacs_jax.config import DataConfig
from pacs_jax.evaluate import evaluate, flatten_metrics, k_values, pass_at_k
from pacs_jax.rewards.pool import VerifierPool

DATA = Path(__file__).parent / "data"


def _brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_equals_subset_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(256, 1, 1), (256, 1, 128), (256, 3, 256), (256, 17, 64), (1024, 5, 512), (256, 255, 2)])
def test_pass_at_k_is_stable_for_large_n(n, c, k):
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(n, c, k)


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(6) == [1, 2, 4, 6]
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(256)[-1] == 256 and len(k_values(256)) == 9


N_SAMPLES = 6
WRONG = ("I think it is \\boxed{-987654}.", "no idea")


def _examples() -> list[Example]:
    rows = load_rows(str(DATA / "math500_test_50.jsonl"), DataConfig(), name="math500")[:8]
    rows += load_rows(str(DATA / "gsm8k_test_50.jsonl"), DataConfig(), name="gsm8k")[:5]
    assert all(row["answer"] != "-987654" for row in rows)
    return [Example(prompt_ids=[1], prompt_text=r["problem"], answer=r["answer"], source=r["source"], problem=r["problem"]) for r in rows]


def _n_correct(index: int) -> int:
    return (index * 5) % (N_SAMPLES + 1)


def _sample_fn(examples, n_samples):
    """Known responses: example i gets _n_correct(i) gold answers (boxed), the rest wrong."""
    out = []
    for i, example in enumerate(examples):
        per_example = []
        for s in range(n_samples):
            text = f"Reasoning... so $\\boxed{{{example.answer}}}$." if s < _n_correct(i) else WRONG[s % 2]
            per_example.append((text, 10 * i + s))
        out.append(per_example)
    return out


def test_evaluate_report_matches_brute_force(tmp_path):
    examples = _examples()
    with VerifierPool("math", workers=1, timeout_s=5.0) as pool:
        result = evaluate(examples, _sample_fn, pool, N_SAMPLES, out_dir=tmp_path)
    assert set(result["sources"]) == {"math500", "gsm8k"}
    assert result["reward/timeouts"] == 0 and result["reward/errors"] == 0
    for source, metrics in result["sources"].items():
        indices = [i for i, e in enumerate(examples) if e.source == source]
        assert metrics["n_problems"] == len(indices) and metrics["n_samples"] == N_SAMPLES
        assert sorted(k for k in metrics if k.startswith("pass@")) == sorted(f"pass@{k}" for k in (1, 2, 4, 6))
        for k in (1, 2, 4, 6):
            expected = sum(_brute_force_pass_at_k(N_SAMPLES, _n_correct(i), k) for i in indices) / len(indices)
            assert metrics[f"pass@{k}"] == pytest.approx(expected, abs=1e-12)
        assert metrics["accuracy"] == pytest.approx(sum(_n_correct(i) for i in indices) / (len(indices) * N_SAMPLES))
        lengths = [10 * i + s for i in indices for s in range(N_SAMPLES)]
        assert metrics["response_length/mean"] == pytest.approx(sum(lengths) / len(lengths))
        boxed = sum(_n_correct(i) + sum(1 for s in range(_n_correct(i), N_SAMPLES) if s % 2 == 0) for i in indices)
        assert metrics["format_ok"] == pytest.approx(boxed / (len(indices) * N_SAMPLES))

    assert json.loads((tmp_path / "eval_metrics.json").read_text()) == json.loads(json.dumps(result))
    lines = [json.loads(line) for line in (tmp_path / "eval_rollouts.jsonl").read_text().splitlines()]
    assert len(lines) == len(examples) * N_SAMPLES
    for line_index, line in enumerate(lines):
        i, s = divmod(line_index, N_SAMPLES)
        assert line["source"] == examples[i].source and line["problem"] == examples[i].problem
        assert line["answer"] == examples[i].answer and line["sample"] == s
        assert line["response"] == _sample_fn(examples, N_SAMPLES)[i][s][0]
        assert line["score"] == (1.0 if s < _n_correct(i) else 0.0)

    flat = flatten_metrics(result)
    assert flat["eval/math500/pass@1"] == result["sources"]["math500"]["pass@1"]
    assert flat["eval/reward/timeouts"] == 0.0


def test_evaluate_checks_the_sampler_output():
    examples = _examples()[:2]
    with VerifierPool("math", workers=1, timeout_s=5.0) as pool:
        with pytest.raises(ValueError, match="sample_fn returned 1 lists for 2 examples"):
            evaluate(examples, lambda e, n: [[("x", 1)] * n], pool, 2)
        with pytest.raises(ValueError, match="3 responses for example 0, expected 2"):
            evaluate(examples, lambda e, n: [[("x", 1)] * 3] * 2, pool, 2)
        with pytest.raises(ValueError, match="n_samples"):
            evaluate(examples, _sample_fn, pool, 0)
