"""Built-in verifiable tasks (no downloads), deterministic from a seed, and the countdown verifier.

Rows look like the real datasets' rows: {"problem", "answer", "solution"}, where "solution"
is a short reference response ending in \\boxed{answer} for the supervised warm-up. Problems
are kept a few characters long so that a tiny character-level model learns them on a CPU.

- arithmetic: "23+58" -> 81, checked by the ordinary maths verifier ("math").
- carryfree: "324+152" -> 476, addition of two d-digit numbers (d = the difficulty) whose
  digits never carry, so each answer digit is the sum of the two digits above it: a task a tiny
  model learns within minutes, with 55^(d-1)*36 distinct problems for d >= 2 (108,900 at d=3),
  so a validation set drawn with another seed is nearly all unseen. Checked by "math".
- countdown: "Make 17 with 3 5 2" -> any expression such as 3*5+2 that uses each given
  number at most once and equals the target; its ground truth "3 5 2 -> 17" is checked by
  `countdown_score` ("pacs_jax.rewards.synthetic:countdown_score" in the pool).

Arithmetic and carryfree answers are integers, and their problem IS an expression equal to the
answer: math-verify evaluates expressions, so "\\boxed{73+62}" (or, for the authors' extraction,
"73 + 62 = ..." with nothing after it) scores 1 against 135 under `math` / `math_authors`, and a
policy learns to copy the problem (SmolLM2 did, within 15 PACS steps). `number_score` /
`number_score_authors` (reward.verifier `number` / `number_authors`) accept only an integer
literal equal to the truth.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from pacs_jax.rewards.math import last_boxed

TASKS = ("arithmetic", "carryfree", "countdown")
_INTEGER_LITERAL = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+|[+-]?\d+")
# A number not glued to a word, a decimal point or another digit ("x2", "1.5" and "2^10" are not
# integer answers; "= 135." is).
_LAST_NUMBER = re.compile(r"(?<![\w.^])(?:[+-]?\d{1,3}(?:,\d{3})+|[+-]?\d+)(?![\w^]|\.\d)")
MAX_EXPRESSION_CHARS = 200


def _check_args(n: int, difficulty: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"data.synthetic_size must be a non-negative integer, got {n!r}")
    if not isinstance(difficulty, int) or difficulty < 1:
        raise ValueError(f"data.synthetic_difficulty must be an integer >= 1, got {difficulty!r}")


def _join(left: str, op: str, right: str, left_is_sum: bool) -> str:
    # Only a product of a sum needs brackets: everything else reads left to right.
    if op == "*" and left_is_sum:
        left = f"({left})"
    return f"{left}{op}{right}"


def arithmetic(n: int, difficulty: int = 1, seed: int = 0) -> list[dict]:
    """n integer-arithmetic rows. Difficulty 1: "a+b" with a, b < 100; 2: one of + - * ;
    d >= 3: d operands, + - * with the usual precedence (products use a one-digit factor)."""
    _check_args(n, difficulty)
    rng = random.Random(f"arithmetic:{difficulty}:{seed}")
    rows = []
    for _ in range(n):
        operands = 2 if difficulty <= 2 else difficulty
        ops = ["+"] if difficulty == 1 else ["+", "-", "*"]
        terms = [rng.randint(0, 99)]
        text = str(terms[0])
        # Evaluate with precedence as we go: `total` holds finished sum terms, `product`
        # the running product term.
        total, product, sign = 0, terms[0], 1
        for _ in range(operands - 1):
            op = rng.choice(ops)
            if op == "*":
                factor = rng.randint(2, 9)
                product *= factor
                text += f"*{factor}"
            else:
                total += sign * product
                sign = 1 if op == "+" else -1
                product = rng.randint(0, 99)
                text += f"{op}{product}"
        answer = str(total + sign * product)
        rows.append({"problem": text, "answer": answer, "solution": f"\\boxed{{{answer}}}"})
    return rows


def carryfree(n: int, difficulty: int = 1, seed: int = 0) -> list[dict]:
    """n rows "a+b" of two `difficulty`-digit numbers (leading digit >= 1 from two digits up;
    0..9 at one digit) whose column sums are all below 10, so no digit carries."""
    _check_args(n, difficulty)
    rng = random.Random(f"carryfree:{difficulty}:{seed}")
    # Each column's digit pair uniformly among the pairs that do not carry.
    pairs = [(a, b) for a in range(10) for b in range(10) if a + b <= 9]
    leading = [(a, b) for a, b in pairs if a and b] if difficulty > 1 else pairs
    rows = []
    for _ in range(n):
        columns = [rng.choice(leading)] + [rng.choice(pairs) for _ in range(difficulty - 1)]
        a_text, b_text = ("".join(str(column[i]) for column in columns) for i in (0, 1))
        answer = str(int(a_text) + int(b_text))
        rows.append({"problem": f"{a_text}+{b_text}", "answer": answer, "solution": f"\\boxed{{{answer}}}"})
    return rows


def countdown(n: int, difficulty: int = 1, seed: int = 0) -> list[dict]:
    """n countdown rows: difficulty + 1 numbers in 1..20 and a reachable target in 1..999."""
    _check_args(n, difficulty)
    rng = random.Random(f"countdown:{difficulty}:{seed}")
    rows = []
    while len(rows) < n:
        numbers = [rng.randint(1, 20) for _ in range(difficulty + 1)]
        order = rng.sample(numbers, len(numbers))
        expression, value, is_sum = str(order[0]), order[0], False
        for number in order[1:]:
            op = rng.choice("+-*")
            expression = _join(expression, op, str(number), is_sum)
            value = value + number if op == "+" else value - number if op == "-" else value * number
            is_sum = op != "*"
        if not 1 <= value <= 999:
            continue
        numbers_text = " ".join(map(str, numbers))
        rows.append({
            "problem": f"Make {value} with {numbers_text}",
            "answer": f"{numbers_text} -> {value}",
            "solution": f"\\boxed{{{expression}}}",
        })
    return rows


def generate(task: str, n: int, difficulty: int = 1, seed: int = 0) -> list[dict]:
    """The rows of synthetic task `task` ("arithmetic", "carryfree" or "countdown")."""
    if task == "arithmetic":
        return arithmetic(n, difficulty, seed)
    if task == "carryfree":
        return carryfree(n, difficulty, seed)
    if task == "countdown":
        return countdown(n, difficulty, seed)
    raise ValueError(f"unknown synthetic task {task!r}; choose one of {list(TASKS)} (e.g. data.train=synthetic:arithmetic)")


# ---------------------------------------------------------------------------- countdown verifier

_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")
_LATEX_OPS = (("\\times", "*"), ("\\cdot", "*"), ("×", "*"), ("\\div", "/"), ("÷", "/"), ("\\left", ""), ("\\right", ""))


class _Invalid(Exception):
    pass


def _tokens(expression: str) -> list[str]:
    tokens = []
    for match in _TOKEN.finditer(expression):
        number, symbol = match.groups()
        if number is not None:
            tokens.append(number)
        elif symbol is not None:
            if symbol not in "+-*/()":
                raise _Invalid(symbol)
            tokens.append(symbol)
    return tokens


def _evaluate(tokens: list[str]) -> tuple[Fraction, list[int]]:
    """Exact value of + - * / ( ) over integer literals, and the literals used (no eval())."""
    position = 0
    literals: list[int] = []

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        if position >= len(tokens):
            raise _Invalid("unexpected end")
        position += 1
        return tokens[position - 1]

    def atom() -> Fraction:
        token = take()
        if token == "(":
            value = sum_()
            if take() != ")":
                raise _Invalid("unbalanced bracket")
            return value
        if token.isdigit():
            literals.append(int(token))
            return Fraction(int(token))
        raise _Invalid(token)

    def product() -> Fraction:
        value = atom()
        while peek() in ("*", "/"):
            op, right = take(), atom()
            if op == "*":
                value *= right
            elif right == 0:
                raise _Invalid("division by zero")
            else:
                value /= right
        return value

    def sum_() -> Fraction:
        value = product()
        while peek() in ("+", "-"):
            op, right = take(), product()
            value = value + right if op == "+" else value - right
        return value

    value = sum_()
    if position != len(tokens):
        raise _Invalid("trailing tokens")
    return value, literals


def parse_countdown_truth(ground_truth: str) -> tuple[list[int], int]:
    """"3 5 2 -> 17" -> ([3, 5, 2], 17)."""
    numbers_text, arrow, target_text = ground_truth.partition("->")
    try:
        numbers = [int(x) for x in numbers_text.split()]
        target = int(target_text)
    except ValueError:
        numbers, arrow = [], ""
    if not arrow or not numbers:
        raise ValueError(f"countdown ground truth must look like '3 5 2 -> 17', got {ground_truth!r}")
    return numbers, target


def countdown_score(response: str, ground_truth: str) -> float:
    """1.0 when the last \\boxed{} expression uses each given number at most once and equals the target."""
    numbers, target = parse_countdown_truth(ground_truth)
    expression = last_boxed(response)
    if expression is None or len(expression) > MAX_EXPRESSION_CHARS:
        return 0.0
    for latex, plain in _LATEX_OPS:
        expression = expression.replace(latex, plain)
    expression = expression.replace("{", "(").replace("}", ")")
    try:
        value, literals = _evaluate(_tokens(expression))
    except (_Invalid, RecursionError):
        return 0.0
    available = list(numbers)
    for literal in literals:
        if literal not in available:
            return 0.0
        available.remove(literal)
    return 1.0 if value == target else 0.0


def _integer_answer(text: str) -> int | None:
    """`text` as an integer literal ("135", "-7", "1,000", " 135. ", "$135$"), else None."""
    text = re.sub(r"^[\s$]+|[\s$.]+$", "", text)
    if not _INTEGER_LITERAL.fullmatch(text):
        return None
    return int(text.replace(",", ""))


def _literal_matches(answer: str | None, ground_truth: str) -> float:
    """1.0 when `answer` is an integer literal equal to the integer `ground_truth`."""
    truth = _integer_answer(str(ground_truth))
    if truth is None or answer is None:
        return 0.0
    return 1.0 if _integer_answer(answer) == truth else 0.0


def number_score(response: str, ground_truth: str) -> float:
    """1.0 when the last \\boxed{} holds the integer `ground_truth` as a literal (an expression
    equal to it, such as the problem itself, scores 0)."""
    return _literal_matches(last_boxed(response), ground_truth)


def number_score_authors(response: str, ground_truth: str) -> float:
    """As `number_score`, with the PACS authors' fallback when there is no \\boxed{}: the last
    number written in the response ("73 + 62 = 135." scores 1; "73 + 62 =" reads 62, not 135)."""
    answer = last_boxed(response)
    if answer is None:
        numbers = _LAST_NUMBER.findall(response)
        answer = numbers[-1] if numbers else None
    return _literal_matches(answer, ground_truth)
