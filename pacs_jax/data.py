"""Training and evaluation data: rows from files, Hugging Face datasets or synthetic tasks,
prompts built with the tokenizer, and a resumable, deterministic stream of prompts.

Every row becomes {"problem", "answer", "source"} (+ "solution" when the data has one), so
the rest of the program never sees a dataset's own field names.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from pacs_jax.rewards import synthetic

_log = logging.getLogger(__name__)

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
FORMATS = ("auto", "deepscaler", "math500", "aime", "amc", "beyondaime", "gsm8k", "custom")
# Formats whose rows already carry `problem` and `answer`. BeyondAIME (ByteDance-Seed/BeyondAIME,
# split "test": 100 problems, paper v2's fifth benchmark) has exactly those two columns, its
# answers integers.
_PROBLEM_ANSWER_FORMATS = ("deepscaler", "math500", "aime", "amc", "beyondaime")
# File stems that say nothing about the data ("test.jsonl"): name the source by its folder.
_GENERIC_STEMS = {"test", "train", "validation", "val", "dev", "data", "test_ori"}
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")  # GSM8K's "<<16-3-4=9>>" annotations


class DataError(ValueError):
    """Bad data or data settings; the message names the file (and line) or key, and the fix."""


# ---------------------------------------------------------------------------- loading rows


def parse_synthetic(source: str, data_config) -> tuple[str, dict]:
    """"synthetic:TASK[?size=N&difficulty=D&seed=S]" -> (TASK, options); the options default to
    data.synthetic_size / synthetic_difficulty / synthetic_seed (a validation set sets its own seed)."""
    task, _, query = source.split(":", 1)[1].partition("?")
    options = {"size": data_config.synthetic_size, "difficulty": data_config.synthetic_difficulty, "seed": data_config.synthetic_seed}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in options or not value.lstrip("-").isdigit():
            raise DataError(f"{source}: option {item!r} must be one of size=N, difficulty=N, seed=N")
        options[key] = int(value)
    return task, options


def source_name(source: str) -> str:
    """A short name for per-source metrics: "math500" for .../math500/test.jsonl."""
    if source.startswith("synthetic:"):
        return source.split(":", 1)[1].partition("?")[0]
    path = Path(source)
    if path.suffix in FILE_SUFFIXES:
        return path.parent.name if path.stem in _GENERIC_STEMS and path.parent.name else path.stem
    return source


def load_rows(source: str, data_config, name: Optional[str] = None) -> list[dict]:
    """Rows {"problem", "answer", "source"[, "solution"]} from `source`.

    `source` is a .jsonl / .json / .parquet file, "synthetic:arithmetic" / "synthetic:countdown"
    or a Hugging Face dataset name (needs the `datasets` package). `data_config` is a
    `pacs_jax.config.DataConfig`; `name` (default: from the source) fills the "source" field.
    """
    if data_config.format not in FORMATS:
        raise DataError(f"data.format={data_config.format!r} is not one of {list(FORMATS)}")
    name = name or source_name(source)
    if source.startswith("synthetic:"):
        task, options = parse_synthetic(source, data_config)
        rows = synthetic.generate(task, options["size"], options["difficulty"], options["seed"])
        return [{**row, "source": name} for row in rows]
    path = Path(source).expanduser()
    if path.suffix in FILE_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        raw = _read_file(path)
    else:
        raw = _read_hub(source, data_config.split)
    return _normalize(raw, data_config, name)


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, raw row) pairs; a row that is not valid JSON comes as a DataError to report."""
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{number}", DataError(f"bad JSON ({e.msg} at column {e.colno})")
    elif path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: bad JSON ({e.msg}); the file must be one JSON list of objects") from e
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects, got a {type(rows).__name__}; use .jsonl for one object per line")
        for index, row in enumerate(rows, start=1):
            yield f"{path}: row {index}", row
    elif path.suffix == ".parquet":
        import pyarrow.parquet

        for index, row in enumerate(pyarrow.parquet.read_table(path).to_pylist(), start=1):
            yield f"{path}: row {index}", row
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {list(FILE_SUFFIXES)}")


def _read_hub(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data source {name!r} is not a file (expected {' / '.join(FILE_SUFFIXES)}) and the Hugging Face "
            f"`datasets` package is not installed; `pip install datasets` or export the data to .jsonl"
        ) from None
    from pacs_jax.gcs import TransientIOError, with_retries

    def load():
        try:
            # Honours HF_DATASETS_OFFLINE / HF_HUB_OFFLINE: with them set, only the local cache is read.
            return datasets.load_dataset(name, split=split)
        except Exception as e:
            if _transient_hub_error(e):  # a 503, a timeout, a dropped connection: tried again
                raise TransientIOError(f"{type(e).__name__}: {e}") from e
            raise DataError(
                f"cannot load Hugging Face dataset {name!r} split {split!r} (data.split): {type(e).__name__}: {e}"
            ) from e

    dataset = with_retries(load, f"downloading Hugging Face dataset {name!r}")
    for index, row in enumerate(dataset, start=1):
        yield f"{name}[{split}] row {index}", row


def _transient_hub_error(error: Exception) -> bool:
    """A download failure that may pass: HTTP 408 / 429 / 5xx, a timeout or a lost connection
    (requests' and httpx's exception names), not a missing or private dataset."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int):
        return status in (408, 429) or status >= 500
    if isinstance(error, FileNotFoundError):
        return False
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        word in type(error).__name__ for word in ("Connect", "Timeout"))


def _detect_format(row: dict, data_config) -> str:
    if "question" in row and "answer" in row and "problem" not in row:
        return "gsm8k"
    if "problem" in row and "answer" in row:
        return "deepscaler"
    if data_config.problem_field in row and data_config.answer_field in row:
        return "custom"
    raise DataError(
        f"cannot tell the row format from its fields {sorted(row)}; set data.format to one of "
        f"{list(FORMATS[1:])} (custom uses data.problem_field / data.answer_field)"
    )


def _answer_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError("missing answer" if value is None else f"answer is a boolean ({value})")
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"answer is a {type(value).__name__}, expected a string or number")
    if not value.strip():
        raise ValueError("empty answer")
    return value.strip()


def _convert(row: dict, row_format: str, data_config) -> dict:
    """One raw row -> our row; ValueError with the reason when it is malformed."""
    if row_format == "gsm8k":
        problem_key, answer_key = "question", "answer"
    elif row_format == "custom":
        problem_key, answer_key = data_config.problem_field, data_config.answer_field
    else:
        problem_key, answer_key = "problem", "answer"
    problem = row.get(problem_key)
    if not isinstance(problem, str) or not problem.strip():
        kind = "missing" if problem is None else f"a {type(problem).__name__}" if not isinstance(problem, str) else "empty"
        raise ValueError(f"field {problem_key!r} is {kind}, expected the problem text")
    if answer_key not in row:
        raise ValueError(f"missing answer field {answer_key!r}")
    answer = _answer_text(row[answer_key])
    solution = row.get("solution") if isinstance(row.get("solution"), str) else None
    if row_format == "gsm8k":
        if "####" not in answer:
            raise ValueError("a gsm8k answer must end with '#### <final answer>'")
        reasoning, final = answer.rsplit("####", 1)
        answer = final.strip().replace(",", "")
        if not answer:
            raise ValueError("empty final answer after '####'")
        reasoning = _CALCULATOR_NOTE.sub("", reasoning).strip()
        solution = f"{reasoning}\nThe answer is \\boxed{{{answer}}}."
    # A LaTeX "\f..." escaped once in the source JSON arrives as a form feed (AIME 2025).
    problem = problem.replace("\x0c", "\\f")
    out = {"problem": problem, "answer": answer}
    if solution is not None:
        out["solution"] = solution
    return out


def _normalize(raw: Iterator[tuple[str, Any]], data_config, name: str) -> list[dict]:
    rows, skipped = [], []
    row_format = None if data_config.format == "auto" else data_config.format
    for location, row in raw:
        try:
            if isinstance(row, DataError):
                raise ValueError(str(row))
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got a {type(row).__name__}")
            if row_format is None:
                row_format = _detect_format(row, data_config)
            converted = _convert(row, row_format, data_config)
        except DataError as e:
            raise DataError(f"{location}: {e}") from None
        except ValueError as e:
            if data_config.malformed_rows == "error":
                raise DataError(
                    f"{location}: malformed row: {e} (set data.malformed_rows=skip to drop such rows)"
                ) from None
            skipped.append(f"{location}: {e}")
            continue
        rows.append({**converted, "source": name})
    if skipped:
        _log.warning("data %s: skipped %d malformed rows; first: %s", name, len(skipped), "; ".join(skipped[:3]))
    return rows


# ---------------------------------------------------------------------------- prompts


@dataclass
class Example:
    """One prompt, tokenized, with what is needed to score and report its responses."""

    prompt_ids: list[int]
    prompt_text: str
    answer: str
    source: str
    problem: str = ""
    solution: Optional[str] = None


def prompt_text(problem: str, tokenizer, data_config) -> tuple[str, bool]:
    """The prompt for `problem` and whether it must be encoded with BOS (raw templates only)."""
    if data_config.prompt_template == "chat":
        return tokenizer.chat_prompt(problem + data_config.instruction, data_config.system_prompt,
                                     data_config.chat_template_kwargs), False
    try:
        return data_config.prompt_template.format(problem=problem, instruction=data_config.instruction), True
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(
            f"data.prompt_template={data_config.prompt_template!r} cannot be filled ({type(e).__name__}: {e}); "
            "it may use {problem} and {instruction} only (double other braces: {{ }})"
        ) from None


def build_examples(rows: list[dict], tokenizer, data_config) -> tuple[list[Example], int]:
    """Tokenized prompts and how many were dropped for exceeding data.max_prompt_tokens."""
    examples, n_filtered = [], 0
    limit = data_config.max_prompt_tokens
    for index, row in enumerate(rows):
        text, add_bos = prompt_text(row["problem"], tokenizer, data_config)
        ids = tokenizer.encode(text, add_bos=add_bos)
        if len(ids) > limit:
            if data_config.overlong_prompts == "error":
                raise DataError(
                    f"{row.get('source', '?')} row {index}: prompt has {len(ids)} tokens > data.max_prompt_tokens="
                    f"{limit}; raise data.max_prompt_tokens or set data.overlong_prompts=filter"
                )
            n_filtered += 1
            continue
        examples.append(
            Example(
                prompt_ids=list(ids),
                prompt_text=text,
                answer=row["answer"],
                source=row.get("source", ""),
                problem=row["problem"],
                solution=row.get("solution"),
            )
        )
    if not examples:
        sources = sorted({str(row.get("source", "?")) for row in rows}) or ["(no rows)"]
        raise DataError(
            f"no usable prompts in {', '.join(sources)}: {len(rows)} rows, {n_filtered} longer than "
            f"data.max_prompt_tokens={limit}"
        )
    if n_filtered:
        _log.warning("data: dropped %d of %d prompts longer than %d tokens", n_filtered, len(rows), limit)
    return examples, n_filtered


# ---------------------------------------------------------------------------- stream


class PromptStream:
    """Endless batches of examples, reshuffled each epoch from (seed, epoch).

    `state()` / `restore()` hold the epoch and position, so a resumed run sees exactly the
    prompts it would have seen without the interruption.
    """

    def __init__(self, examples: list[Example], seed: int = 0, shuffle: bool = True):
        if not examples:
            raise DataError("PromptStream needs at least one example")
        self.examples = examples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            # A string seed goes through SHA-512: stable across Python versions and processes.
            random.Random(f"prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n_prompts: int) -> list[Example]:
        """The next `n_prompts` examples, continuing into the next epoch when this one ends."""
        if n_prompts < 1:
            raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
        batch = []
        while len(batch) < n_prompts:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(n_prompts - len(batch), len(self._order) - self.position)
            batch.extend(self.examples[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_examples": len(self.examples)}

    def restore(self, state: dict) -> None:
        if state.get("num_examples") != len(self.examples) or state.get("seed") != self.seed:
            raise DataError(
                f"data stream state is for {state.get('num_examples')} examples with seed {state.get('seed')}, "
                f"but this run has {len(self.examples)} with seed {self.seed}; the training data or "
                "trainer.seed changed since the checkpoint"
            )
        if not 0 <= state["position"] <= len(self.examples) or state["epoch"] < 0:
            raise DataError(f"data stream state {state} is out of range")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
