"""Binary maths rewards with math-verify: `score` (the last \\boxed{} only) and `score_authors`
(the PACS authors' rule: an answer anywhere in the response).

`score` (reward.verifier `math`) reads only the response's LAST \\boxed{...} (found with a
brace matcher, so nested braces work); no box, or one cut off, scores 0. It tidies GSM8K-style
numbers that math-verify alone scores 0 ("1,000", "$18", "18 dollars", "18.") when the truth is
a plain number, but refuses trailing words that change the number ("3 pi", "3 thousand",
"4 or more"). Then math-verify compares: the ground truth wrapped in \\boxed{} and parsed as
LaTeX, the boxed content parsed as LaTeX, then as a plain expression.

`score_authors` (reward.verifier `math_authors`) is the authors' src/reward_function.py:
math-verify's `math_metric` over the whole response, with the same extraction settings. It
takes a \\boxed{} answer first, then "final answer is X", then "answer: X", then the last
number or LaTeX expression anywhere, so an unboxed answer can score 1. It is the reward the
paper trained with, so numbers compared with the paper's need it.

math-verify's own timeouts use signal.alarm, which only works in a main thread, cannot stop
long C-level work (big integer powers), and would cancel the pool's own SIGALRM timer. They
are switched off here; responses should be scored through `VerifierPool`, which enforces the
time limit.
"""

from __future__ import annotations

import functools
import logging
import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# Longer boxed contents are never a competition answer (MATH-500's longest is 53 chars);
# refusing them early keeps degenerate rollouts from costing a full timeout each.
MAX_ANSWER_CHARS = 1000

_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_GROUPED_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
# A number followed by optional unit words: "$18", "18 dollars", "1,000 \text{ m}".
_NUMBER_WITH_UNITS = re.compile(
    r"(?:\\\$|\$)?\s*(?P<number>-?\d[\d,]*(?:\.\d+)?)\s*"
    r"(?P<units>\\(?:text|mathrm|mbox|textrm)\s*\{[^{}]*\}|[A-Za-z]{2,}(?:\s+[A-Za-z]+)*)?"
)
# Trailing words that are not units: they change the number ("3 pi", "2 squared", "3 thousand",
# "5 factorial", "5 below zero") or make it a bound ("4 or more", "40 plus"). Any other words
# count as units. GSM8K's units are open-ended ("5 more apples", "3 miles per hour"), so a list
# of units could never be complete; this list is short. "times" and "dozen" are units here:
# GSM8K asks "how many times ..." and "how many dozen ...", and a truth of 4 for a question
# asked in eggs would be 48, not 4. math-verify itself drops any \text{...}, so these words
# must be caught before it sees them.
_VALUE_CHANGING_WORDS = frozenset(
    "pi squared cubed factorial sqrt root power reciprocal inverse plus minus negative below "
    "hundred hundreds thousand thousands million millions billion billions trillion trillions "
    "tenths hundredths thousandths half halves or least most".split()
)
_THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)\\[,!;: ](?=\d{3}(?!\d))")


class _DropTimeoutDisabledWarning(logging.Filter):
    # We disable math-verify's timeouts on purpose (see the module docstring); its
    # one-time warning about that would only alarm readers of the training log.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def last_boxed(response: str) -> str | None:
    """Content of the last \\boxed{...}, or None when there is none or it never closes."""
    opening = None
    for opening in _BOXED_OPEN.finditer(response):
        pass
    if opening is None:
        return None
    depth = 1
    start = opening.end()
    for position in range(start, len(response)):
        char = response[position]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return response[start:position]
    return None  # truncated mid-answer: no final answer


def has_boxed(response: str) -> bool:
    """Format metric: does the response end its reasoning with a complete \\boxed{...}?"""
    return last_boxed(response) is not None


def _normalize_ground_truth(ground_truth: str) -> str:
    answer = ground_truth.strip()
    if _GROUPED_NUMBER.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer


def _normalize_prediction(content: str, numeric_truth: bool) -> str:
    content = content.strip()
    if content.endswith("."):
        content = content[:-1].rstrip()
    if numeric_truth:
        content = _THIN_SPACE_THOUSANDS.sub("", content)
        match = _NUMBER_WITH_UNITS.fullmatch(content)
        if match:
            words = re.findall(r"[A-Za-z]+", match.group("units") or "")
            if any(word.lower() in _VALUE_CHANGING_WORDS for word in words):
                return ""  # a different number, or a bound: never equal to a plain number
            number = match.group("number")
            content = number.replace(",", "") if _GROUPED_NUMBER.fullmatch(number) else number
    return content


@functools.lru_cache(maxsize=4096)
def _parse_ground_truth(answer: str) -> tuple:
    # A group of G responses shares one ground truth: parse it once.
    parsed = parse("\\boxed{" + answer + "}", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    return tuple(parsed)


def score(response: str, ground_truth: str) -> float:
    """1.0 when the response's last \\boxed{} answer equals `ground_truth` per math-verify, else 0.0."""
    content = last_boxed(response)
    if content is None or len(content) > MAX_ANSWER_CHARS:
        return 0.0
    answer = _normalize_ground_truth(ground_truth)
    gold = list(_parse_ground_truth(answer))
    if not gold:
        return 0.0
    content = _normalize_prediction(content, numeric_truth=_PLAIN_NUMBER.fullmatch(answer) is not None)
    if not content:
        return 0.0
    prediction = parse(
        "\\boxed{" + content + "}",
        extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )
    if not prediction:
        return 0.0
    return 1.0 if verify(gold, prediction, timeout_seconds=None) else 0.0


_AUTHORS_PREDICTION_TARGETS = [ExprExtractionConfig(), LatexExtractionConfig()]


def score_authors(response: str, ground_truth: str) -> float:
    """The PACS authors' reward: 1.0 when math-verify finds an answer anywhere in `response`
    equal to `ground_truth` (their `math_metric` call, without its signal-based timeouts)."""
    # As theirs: the raw ground truth, boxed; an unreadable one raises in math_metric, which
    # their `except Exception` turns into 0.
    gold = list(_parse_ground_truth(ground_truth))
    if not gold:
        return 0.0
    prediction = parse(response, extraction_config=_AUTHORS_PREDICTION_TARGETS, parsing_timeout=None)
    # math_metric compares with precision 6 (verify's float_rounding) and takes the max over
    # one prediction: a plain verify.
    return 1.0 if verify(gold, prediction, float_rounding=6, timeout_seconds=None) else 0.0
