"""Rewards: the maths verifier against math-verify and real answers, the pool's survival of
hung and crashing checks, and the synthetic tasks against independent references."""

import json
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from math_verify.metric import math_metric

from pacs_jax.rewards.math import has_boxed, last_boxed, score, score_authors
from pacs_jax.rewards.pool import VerifierError, VerifierPool, resolve_verifier
from pacs_jax.rewards.synthetic import arithmetic, countdown, countdown_score, generate, number_score, number_score_authors

DATA = Path(__file__).parent / "data"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _gsm8k_final(answer: str) -> str:
    return answer.split("####")[-1].strip()


# ---------------------------------------------------------------------------- boxed extraction


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {x^{2}}", "x^{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{3} and then \\boxed{4", None),  # the final answer was cut off
        ("no box here: 42", None),
        ("", None),
        ("\\boxed 5", None),  # math-verify only knows \boxed{...}
    ],
)
def test_last_boxed(response, expected):
    assert last_boxed(response) == expected
    assert has_boxed(response) == (expected is not None)


# ---------------------------------------------------------------------------- maths verifier


def _check_gsm8k(rows: list[dict]) -> None:
    for row in rows:
        final = _gsm8k_final(row["answer"])
        gold = final.replace(",", "")
        assert score(f"The total is \\boxed{{{gold}}}.", gold) == 1.0, final
        assert score(f"So \\boxed{{{final}}}", gold) == 1.0, final  # as written, "1,600"
        assert score(f"\\boxed{{{int(gold) + 1}}}", gold) == 0.0, final
        assert score(f"The answer is {gold}.", gold) == 0.0  # no box, no reward


def test_gsm8k_vendored_gold_scores_one_and_gold_plus_one_zero():
    rows = _jsonl(DATA / "gsm8k_test_50.jsonl")
    assert len(rows) == 50 and any("," in _gsm8k_final(r["answer"]) for r in rows)
    _check_gsm8k(rows)


def test_gsm8k_full_test_set(shared_data):
    rows = _jsonl(shared_data / "gsm8k" / "test.jsonl")
    assert len(rows) == 1319
    _check_gsm8k(rows)


def _check_math500(rows: list[dict]) -> None:
    for row in rows:
        assert score(f"Hence the answer is $\\boxed{{{row['answer']}}}$.", row["answer"]) == 1.0, row["answer"]


def test_math500_vendored_gold_scores_one():
    _check_math500(_jsonl(DATA / "math500_test_50.jsonl"))


def test_math500_full_gold_scores_one(shared_data):
    rows = _jsonl(shared_data / "math500" / "test.jsonl")
    assert len(rows) == 500
    _check_math500(rows)


@pytest.mark.parametrize(
    "prediction, gold",
    [
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "0.5"),
        ("\\frac{1}{3}", "0.5"),
        ("x=3", "3"),
        ("x = 3", "3"),
        ("3", "x=3"),
        ("x=4", "3"),
        ("  \\frac{ 1 }{ 2 } ", "\\frac{1}{2}"),
        ("2\\sqrt{2}", "\\sqrt{8}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\pi/2", "\\frac{\\pi}{2}"),
        ("[2,5)", "[2,5)"),
        ("(2,5)", "[2,5)"),
        ("\\text{Evelyn}", "\\text{Evelyn}"),
        ("10\\%", "10"),
        ("x^2+2x+1", "(x+1)^2"),
    ],
)
def test_rewritings_follow_math_verify(prediction, gold):
    # The reference: math-verify called directly, as the PACS authors' reward calls it.
    expected = verify(
        parse(f"\\boxed{{{gold}}}", extraction_config=[LatexExtractionConfig()]),
        parse(f"\\boxed{{{prediction}}}", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()]),
    )
    assert score(f"We get $\\boxed{{{prediction}}}$", gold) == float(expected)


def test_score_works_outside_the_main_thread():
    # math-verify's signal-based timeouts would raise here; ours are off (the pool limits time).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as threads:
        assert list(threads.map(score, ["\\boxed{0.5}", "\\boxed{2}"], ["\\frac{1}{2}", "3"])) == [1.0, 0.0]


@pytest.mark.parametrize(
    "boxed, gold, expected",
    [
        ("1,000", "1000", 1.0),
        ("1\\,000", "1000", 1.0),
        ("\\$18", "18", 1.0),
        ("18 dollars", "18", 1.0),
        ("18 \\text{ dollars}", "18", 1.0),
        ("18.", "18", 1.0),
        ("\\$1,250.", "1250", 1.0),
        ("19 dollars", "18", 0.0),
        ("1,001", "1000", 0.0),
        ("-10", "-10", 1.0),
        ("10", "-10", 0.0),
        # Units still pass, including the ones GSM8K asks for ("how many times", "how many dozen").
        ("12 \\text{ cm}", "12", 1.0),
        ("5 \\text{ more apples}", "5", 1.0),
        ("3 miles per hour", "3", 1.0),
        ("3 times", "3", 1.0),
        ("4 dozen", "4", 1.0),
        ("25 percent", "25", 1.0),
        # Words that change the value, or make it a bound, are not units.
        ("3 pi", "3", 0.0),
        ("3 \\text{ pi}", "3", 0.0),
        ("2 squared", "2", 0.0),
        ("3 thousand", "3", 0.0),
        ("3 \\text{ thousand dollars}", "3", 0.0),
        ("\\$2 million", "2", 0.0),
        ("4 \\text{ or more}", "4", 0.0),
        ("4 or less", "4", 0.0),
        ("5 \\text{ below zero}", "5", 0.0),
        ("5 factorial", "5", 0.0),
    ],
)
def test_gsm8k_style_numbers(boxed, gold, expected):
    assert score(f"\\boxed{{{boxed}}}", gold) == expected


# ---------------------------------------------------------------------------- the authors' rule


def _authors_compute_score(response: str, ground_truth: str) -> float:
    """The reference: the PACS authors' src/reward_function.py, as they call math-verify (its
    own signal-based timeouts on, so main thread only)."""
    verify_func = math_metric(
        gold_extraction_target=(LatexExtractionConfig(),),
        pred_extraction_target=(ExprExtractionConfig(), LatexExtractionConfig()),
    )
    try:
        return verify_func(["\\boxed{" + ground_truth + "}"], [response])[0]
    except Exception:
        return 0.0


AUTHORS_CASES = [
    # unboxed answers: the last number or expression counts
    ("The answer is 42.", "42", 1.0),
    ("We have $x = 5$, so $2x = 10$.", "10", 1.0),
    ("It costs 1,000 dollars.", "1000", 1.0),
    # "final answer is" and "Answer:" anchors win over later expressions
    ("So the final answer is $\\frac{1}{2}$.", "\\frac{1}{2}", 1.0),
    ("Final answer: 0.5", "\\frac12", 1.0),
    ("I first got 7. Therefore, the final answer is 8.", "8", 1.0),
    ("I first got 7. Therefore, the final answer is 8.", "7", 0.0),
    ("Answer: 12. Hmm, maybe 13.", "12", 1.0),
    # a boxed answer wins over anything after it
    ("\\boxed{5}. Check: 2+3 = 6", "5", 1.0),
    ("\\boxed{5}. Check: 2+3 = 6", "6", 0.0),
    ("The final answer is $\\boxed{3\\pi}$", "3\\pi", 1.0),
    # wrong, empty, and a ground truth math-verify cannot read
    ("The answer is 41.", "42", 0.0),
    ("\\boxed{41}", "42", 0.0),
    ("", "3", 0.0),
    ("The answer is 42.", "", 0.0),
]


@pytest.mark.parametrize("response, gold, expected", AUTHORS_CASES)
def test_authors_rule_matches_their_reward_function(response, gold, expected):
    assert _authors_compute_score(response, gold) == expected  # hand-checked labels
    assert score_authors(response, gold) == expected


def test_authors_rule_differs_from_boxed_only_on_unboxed_answers():
    assert score("The answer is 42.", "42") == 0.0 and score_authors("The answer is 42.", "42") == 1.0
    assert score("\\boxed{42}", "42") == score_authors("\\boxed{42}", "42") == 1.0


def test_authors_rule_on_math500_unboxed_answers():
    rows = _jsonl(DATA / "math500_test_50.jsonl")
    for row in rows:
        response = f"Putting it together, the final answer is ${row['answer']}$."
        assert score_authors(response, row["answer"]) == _authors_compute_score(response, row["answer"]), row["answer"]
    assert sum(score_authors(f"The final answer is ${r['answer']}$.", r["answer"]) for r in rows) >= 45


def test_authors_rule_works_outside_the_main_thread():
    # The authors' math_metric would raise here (signal.alarm); ours leaves time limits to the pool.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as threads:
        assert list(threads.map(score_authors, ["x is 0.5", "so 2"], ["\\frac{1}{2}", "3"])) == [1.0, 0.0]


# ---------------------------------------------------------------------------- pool


ADVERSARIAL = [
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{(10^{10})!}",
    "\\boxed{100000!}",
    "\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}",
    "\\boxed{" + "{" * 400 + "7" + "}" * 400 + "}",
    "{" * 100_000,
    "\\boxed{\\frac{1}{\\sqrt{}}^^_\\left(}",
    "",
]


@pytest.fixture(scope="module")
def math_pool():
    with VerifierPool("math", workers=2, timeout_s=1.0, deadline_s=120.0) as pool:
        yield pool


def test_pool_scores_in_order_with_adversarial_items_mixed_in(math_pool):
    rows = _jsonl(DATA / "math500_test_50.jsonl")[:12]
    responses, truths, expected = [], [], []
    for i, row in enumerate(rows):
        right = i % 3 != 0
        responses.append(f"\\boxed{{{row['answer']}}}" if right else "\\boxed{\\text{no idea}}")
        truths.append(row["answer"])
        expected.append(1.0 if right else 0.0)
        if i < len(ADVERSARIAL):
            responses.append(ADVERSARIAL[i])
            truths.append("81")
            expected.append(0.0)
    scores, stats = math_pool.score_batch(responses, truths)
    assert scores == expected
    assert stats["reward/timeouts"] >= 1  # the power tower cannot finish in a second
    assert stats["reward/timeouts"] + stats["reward/errors"] <= len(ADVERSARIAL)
    assert stats["reward/deadline_missed"] == 0
    assert stats["reward/format_ok"] == pytest.approx(sum(map(has_boxed, responses)) / len(responses))
    # The pool still works normally afterwards.
    assert math_pool.score_batch(["\\boxed{2}", "\\boxed{3}"], ["2", "2"])[0] == [1.0, 0.0]


def test_pool_submit_is_non_blocking_and_keeps_order(math_pool):
    first = math_pool.submit(["\\boxed{1}", "\\boxed{0.5}"], ["1", "\\frac12"])
    second = math_pool.submit(["\\boxed{7}"] * 5, [str(i) for i in range(5, 10)])
    assert second.result(timeout=60)[0] == [0.0, 0.0, 1.0, 0.0, 0.0]
    scores, stats = first.result(timeout=60)
    assert scores == [1.0, 1.0] and stats["reward/format_ok"] == 1.0
    scores, stats = math_pool.score_batch([], [])
    assert scores == [] and stats["reward/format_ok"] == 0.0 and stats["reward/errors"] == 0


def test_pool_survives_crashing_and_hanging_verifiers():
    responses = ["a", "exit", "b", "segfault", "raise", "sleep", "spin", "deaf", "nan", "c"]
    truths = ["a", "exit", "b", "segfault", "raise", "sleep", "spin", "deaf", "nan", "x"]
    with VerifierPool("verifiers_for_tests:misbehaving", workers=2, timeout_s=0.5, deadline_s=60.0) as pool:
        scores, stats = pool.score_batch(responses, truths)
        assert scores == [1.0, 0, 1.0, 0, 0, 0, 0, 0, 0, 0]
        assert stats["reward/errors"] == 4  # exit, segfault, raise, nan
        assert stats["reward/timeouts"] == 3  # sleep, spin (interrupted), deaf (killed)
        assert stats["reward/worker_restarts"] == 3  # exit, segfault, deaf
        assert stats["reward/deadline_missed"] == 0
        scores, stats = pool.score_batch(["a", "b", "a"], ["a", "a", "a"])
        assert scores == [1.0, 0.0, 1.0] and stats["reward/worker_restarts"] == 0


def test_pool_batch_deadline_gives_up_on_the_rest():
    with VerifierPool("verifiers_for_tests:misbehaving", workers=1, timeout_s=30.0, deadline_s=3.0) as pool:
        assert pool.score_batch(["a"], ["a"])[0] == [1.0]  # the worker is up before the timed batch
        scores, stats = pool.score_batch(["sleep", "a", "a"], ["a", "a", "a"])
        assert scores == [0.0, 0.0, 0.0]
        assert stats["reward/deadline_missed"] == 3 and stats["reward/worker_restarts"] == 1


def test_pool_from_config_runs_the_countdown_verifier():
    from pacs_jax.config import RewardConfig

    rows = countdown(20, difficulty=2, seed=3)
    responses = [r["solution"] for r in rows[:10]] + ["\\boxed{1+1}"] * 10
    config = RewardConfig(verifier="pacs_jax.rewards.synthetic:countdown_score", workers=1, timeout_s=2.0)
    with VerifierPool.from_config(config) as pool:
        scores, _ = pool.score_batch(responses, [r["answer"] for r in rows])
    assert scores == [1.0] * 10 + [countdown_score("\\boxed{1+1}", r["answer"]) for r in rows[10:]]


def test_pool_runs_the_authors_rule_by_name_under_its_time_limit():
    responses = [
        "The answer is 42.",
        "So the final answer is $\\frac{1}{2}$.",
        "The answer is 41.",
        "The final answer is $9^{9^{9^{9}}}$.",  # sympy cannot finish this: the pool's limit stops it
        "Final answer: 7",
    ]
    truths = ["42", "0.5", "42", "81", "7"]
    with VerifierPool("math_authors", workers=1, timeout_s=1.0, deadline_s=60.0) as pool:
        scores, stats = pool.score_batch(responses, truths)
        assert scores == [1.0, 1.0, 0.0, 0.0, 1.0]
        assert stats["reward/timeouts"] == 1 and stats["reward/errors"] == 0
        assert stats["reward/format_ok"] == 0.0  # nothing was boxed, yet three score 1
        # The pool still works afterwards, and its time limit still holds.
        scores, stats = pool.score_batch(["The answer is 3.", "The answer is $9^{9^{9^{9}}}$."], ["3", "81"])
        assert scores == [1.0, 0.0] and stats["reward/timeouts"] == 1


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("qwen2.5_*.yaml")))
def test_paper_configs_use_the_authors_rule(path):
    import yaml

    # Read as YAML, not load_config: these configs name model folders that are not here.
    assert yaml.safe_load(path.read_text())["reward"]["verifier"] == "math_authors"


def test_config_names_the_verifiers():
    from pacs_jax.config import ConfigError, load_config

    arch = "model.arch={hidden_size: 8}"
    assert load_config(overrides=[arch, "reward.verifier=math_authors"]).reward.verifier == "math_authors"
    with pytest.raises(ConfigError, match=r"reward.verifier must be one of \['math', 'math_authors', 'number', 'number_authors'\]"):
        load_config(overrides=[arch, "reward.verifier=math_author"])


# (response, number, number_authors) against the truth 135. The first two rows are the policy's
# exploit that math-verify accepts: the problem "73+62" is an expression equal to the answer.
NUMBER_CASES = [
    ("\\boxed{73+62}", 0.0, 0.0),
    ("73 + 62 = \\box{}", 0.0, 0.0),
    ("The answer is 73+62", 0.0, 0.0),
    ("\\boxed{135}", 1.0, 1.0),
    ("so \\boxed{ $135$. }", 1.0, 1.0),
    ("\\boxed{0135}", 1.0, 1.0),
    ("73 + 62 = 135.", 0.0, 1.0),  # no box: only the authors' fallback reads the last number
    ("73 + 62 = 135 apples", 0.0, 1.0),
    ("135 is wrong, it is 136", 0.0, 0.0),
    ("\\boxed{136} but 135", 0.0, 0.0),  # a box wins over later numbers, as the authors' order
    ("x135", 0.0, 0.0),
    ("135.5", 0.0, 0.0),
    ("\\boxed{1,35}", 0.0, 0.0),
    ("", 0.0, 0.0),
]


@pytest.mark.parametrize("response, boxed_only, authors", NUMBER_CASES)
def test_number_verifiers_want_an_integer_literal(response, boxed_only, authors):
    assert number_score(response, "135") == boxed_only
    assert number_score_authors(response, "135") == authors


def test_math_verify_accepts_the_problem_as_its_own_answer():
    # Why the arithmetic tasks need the number verifiers: math-verify evaluates expressions.
    assert score("\\boxed{73+62}", "135") == 1.0
    assert score_authors("73 + 62 = \\box{}", "135") == 1.0


def test_number_verifiers_agree_with_math_on_literal_answers():
    rows = arithmetic(200, difficulty=2, seed=3)
    for row in rows:
        for response in (f"\\boxed{{{row['answer']}}}", f"\\boxed{{{int(row['answer']) + 1}}}"):
            assert number_score(response, row["answer"]) == score(response, row["answer"])


def test_pool_runs_the_number_verifier_by_name():
    with VerifierPool("number_authors", workers=1, timeout_s=5.0, deadline_s=60.0) as pool:
        scores, _ = pool.score_batch([r for r, _, _ in NUMBER_CASES], ["135"] * len(NUMBER_CASES))
    assert scores == [a for _, _, a in NUMBER_CASES]


@pytest.mark.parametrize("spec", ["nonexistent_module_xyz:f", "pacs_jax.rewards.math:nope", "math_score"])
def test_bad_verifier_spec_is_a_clear_error(spec):
    with pytest.raises(VerifierError, match="reward.verifier"):
        resolve_verifier(spec)


def test_pool_rejects_mismatched_inputs(math_pool):
    with pytest.raises(ValueError, match="2 responses but 1"):
        math_pool.submit(["a", "b"], ["a"])
    with pytest.raises(TypeError, match=r"responses\[1\]"):
        math_pool.submit(["a", None], ["a", "b"])


# ---------------------------------------------------------------------------- synthetic tasks


@pytest.mark.parametrize("difficulty", [1, 2, 3, 5])
def test_arithmetic_answers_match_python(difficulty):
    rows = arithmetic(200, difficulty, seed=7)
    assert rows == arithmetic(200, difficulty, seed=7)
    assert rows != arithmetic(200, difficulty, seed=8)
    for row in rows:
        assert re.fullmatch(r"[0-9+\-*]+", row["problem"])
        assert int(row["answer"]) == eval(row["problem"])  # noqa: S307 -- our own digits and + - *
        assert row["solution"] == f"\\boxed{{{row['answer']}}}"
        assert score(row["solution"], row["answer"]) == 1.0
    if difficulty == 1:
        assert max(len(r["problem"]) for r in rows) <= 5


def _reference_countdown(expression: str, numbers: list[int], target: int) -> float:
    """Independent check: Python's own evaluator on Fractions, and a multiset comparison."""
    literals = [int(x) for x in re.findall(r"\d+", expression)]
    if Counter(literals) - Counter(numbers):
        return 0.0
    try:
        value = eval(re.sub(r"(\d+)", r"Fraction(\1)", expression), {"Fraction": Fraction})  # noqa: S307
    except ZeroDivisionError:
        return 0.0
    return 1.0 if value == target else 0.0


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_countdown_rows_are_solvable_and_deterministic(difficulty):
    rows = countdown(100, difficulty, seed=1)
    assert rows == countdown(100, difficulty, seed=1) and rows != countdown(100, difficulty, seed=2)
    for row in rows:
        numbers, target = row["answer"].split("->")
        numbers = [int(x) for x in numbers.split()]
        assert len(numbers) == difficulty + 1 and 1 <= int(target) <= 999
        assert countdown_score(row["solution"], row["answer"]) == 1.0
        assert _reference_countdown(last_boxed(row["solution"]), numbers, int(target)) == 1.0


def test_countdown_score_matches_reference_on_random_expressions():
    import random

    rng = random.Random(0)
    checked = Counter()
    for _ in range(2000):
        numbers = [rng.randint(1, 9) for _ in range(3)]
        used = [rng.choice(numbers + [rng.randint(1, 9)]) for _ in range(rng.randint(1, 4))]
        expression = str(used[0])
        for number in used[1:]:
            expression += rng.choice("+-*/") + str(number)
            if rng.random() < 0.3:
                expression = f"({expression})"
        target = rng.choice([rng.randint(0, 30), int(_fraction_or(expression, 0))])
        truth = " ".join(map(str, numbers)) + f" -> {target}"
        got = countdown_score(f"\\boxed{{{expression}}}", truth)
        assert got == _reference_countdown(expression, numbers, target), (expression, truth)
        checked[got] += 1
    assert checked[1.0] > 100 and checked[0.0] > 100


def _fraction_or(expression: str, default):
    try:
        return eval(re.sub(r"(\d+)", r"Fraction(\1)", expression), {"Fraction": Fraction})  # noqa: S307
    except ZeroDivisionError:
        return default


@pytest.mark.parametrize(
    "response, expected",
    [
        ("\\boxed{3 \\times 5 + 2}", 1.0),
        ("\\boxed{3\\cdot5+2}", 1.0),
        ("\\boxed{(3*5)+2}", 1.0),
        ("\\boxed{3*5+2+2}", 0.0),  # 2 used twice
        ("\\boxed{17}", 0.0),  # 17 is not given
        ("\\boxed{3*5+2=17}", 0.0),  # an expression only
        ("\\boxed{3*5+}", 0.0),
        ("\\boxed{__import__('os')}", 0.0),
        ("3*5+2", 0.0),
    ],
)
def test_countdown_score_cases(response, expected):
    assert countdown_score(response, "3 5 2 -> 17") == expected


def test_countdown_bad_ground_truth_is_a_clear_error():
    with pytest.raises(ValueError, match="3 5 2 -> 17"):
        countdown_score("\\boxed{1}", "17")


def test_generate_rejects_unknown_task_and_bad_difficulty():
    with pytest.raises(ValueError, match="synthetic:arithmetic"):
        generate("sudoku", 3)
    with pytest.raises(ValueError, match="synthetic_difficulty"):
        arithmetic(3, difficulty=0)
