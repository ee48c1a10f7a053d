"""Data: loaders on the real evaluation files, malformed-row policies, prompt building with real
tokenizers, and the resumable prompt stream."""

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from pacs_jax.config import DataConfig
from pacs_jax.data import DataError, PromptStream, build_examples, load_rows, source_name
from pacs_jax.models.tokenizer import CHAR_ALPHABET, CHAR_SPECIALS, load_tokenizer
from pacs_jax.rewards import synthetic

DATA = Path(__file__).parent / "data"


def _config(**changes) -> DataConfig:
    return dataclasses.replace(DataConfig(), **changes)


def _raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------- loaders


@pytest.mark.parametrize(
    "folder, count, has_solution", [("aime24", 30, False), ("aime25", 30, False), ("amc23", 40, False), ("math500", 500, True)]
)
def test_shared_problem_answer_sets(shared_data, folder, count, has_solution):
    path = shared_data / folder / "test.jsonl"
    rows = load_rows(str(path), _config())
    raw = _raw(path)
    assert len(rows) == count == len(raw)
    for row, original in zip(rows, raw):
        assert row["source"] == folder
        assert row["answer"] == original["answer"].strip()
        assert row["problem"] == original["problem"].replace("\x0c", "\\f")
        assert ("solution" in row) == has_solution
    assert not any("\x0c" in row["problem"] for row in rows)
    named = {"aime24": "aime", "aime25": "aime", "amc23": "amc", "math500": "math500"}[folder]
    assert load_rows(str(path), _config(format=named)) == rows


def test_shared_gsm8k_test_set(shared_data):
    path = shared_data / "gsm8k" / "test.jsonl"
    rows = load_rows(str(path), _config())
    raw = _raw(path)
    assert len(rows) == 1319
    for row, original in zip(rows, raw):
        final = original["answer"].split("####")[-1].strip().replace(",", "")
        assert row["problem"] == original["question"] and row["answer"] == final
        assert int(row["answer"]) == int(final)
        assert row["solution"].endswith(f"\\boxed{{{final}}}.") and "<<" not in row["solution"]
    assert load_rows(str(path), _config(format="gsm8k")) == rows


def test_vendored_subsets_load_with_auto_and_named_formats():
    gsm8k = load_rows(str(DATA / "gsm8k_test_50.jsonl"), _config())
    assert len(gsm8k) == 50 and gsm8k[0]["source"] == "gsm8k_test_50"
    assert all("," not in row["answer"] and row["answer"].lstrip("-").isdigit() for row in gsm8k)
    assert sum(row["answer"].startswith("-") for row in gsm8k) == 2
    math500 = load_rows(str(DATA / "math500_test_50.jsonl"), _config(format="math500"), name="math500")
    assert len(math500) == 50 and {row["source"] for row in math500} == {"math500"}
    assert [r["answer"] for r in math500] == [r["answer"] for r in _raw(DATA / "math500_test_50.jsonl")]


def test_json_and_parquet_match_jsonl(tmp_path):
    import pyarrow
    import pyarrow.parquet

    raw = _raw(DATA / "math500_test_50.jsonl")
    (tmp_path / "m.json").write_text(json.dumps(raw))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(raw), tmp_path / "m.parquet")
    expected = load_rows(str(DATA / "math500_test_50.jsonl"), _config(), name="m")
    assert load_rows(str(tmp_path / "m.json"), _config()) == expected
    assert load_rows(str(tmp_path / "m.parquet"), _config()) == expected


def test_custom_fields_and_number_answers(tmp_path):
    path = tmp_path / "custom.jsonl"
    path.write_text('{"q": "1+1?", "a": 2}\n\n{"q": "Half of 1?", "a": "1/2 "}\n')
    config = _config(format="custom", problem_field="q", answer_field="a")
    assert load_rows(str(path), config) == [
        {"problem": "1+1?", "answer": "2", "source": "custom"},
        {"problem": "Half of 1?", "answer": "1/2", "source": "custom"},
    ]
    # auto finds the custom fields too
    assert load_rows(str(path), _config(problem_field="q", answer_field="a")) == load_rows(str(path), config)
    with pytest.raises(DataError, match=r"custom.jsonl:1: cannot tell the row format .*data.format"):
        load_rows(str(path), _config())


MALFORMED = (
    '{"problem": "ok 1", "answer": "1"}\n'
    '{"problem": "ok 2", "answer": 2}\n'
    '{"problem": "broken", "answer": \n'
    '{"problem": "no answer"}\n'
    '{"problem": ["not", "text"], "answer": "3"}\n'
    '{"problem": "null answer", "answer": null}\n'
    '[1, 2]\n'
    '{"problem": "ok 3", "answer": "x"}\n'
)


def test_malformed_rows_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(MALFORMED)
    with pytest.raises(DataError, match=rf"{path}:3: malformed row: bad JSON .*data.malformed_rows=skip"):
        load_rows(str(path), _config(malformed_rows="error"))
    path.write_text(MALFORMED.replace('"answer": \n', '"answer": "7"}\n'))
    with pytest.raises(DataError, match=rf"{path}:4: malformed row: missing answer field 'answer'"):
        load_rows(str(path), _config(malformed_rows="error"))


def test_malformed_rows_skip_reports_count(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_text(MALFORMED)
    with caplog.at_level(logging.WARNING, logger="pacs_jax.data"):
        rows = load_rows(str(path), _config(malformed_rows="skip"))
    assert [r["problem"] for r in rows] == ["ok 1", "ok 2", "ok 3"]
    assert "skipped 5 malformed rows" in caplog.text and f"{path}:3: bad JSON" in caplog.text


def test_gsm8k_row_without_final_answer_is_malformed(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text('{"question": "q1", "answer": "so 5\\n#### 1,250"}\n{"question": "q2", "answer": "no marker"}\n')
    with pytest.raises(DataError, match=r"g.jsonl:2: malformed row: a gsm8k answer must end with '####"):
        load_rows(str(path), _config())
    assert load_rows(str(path), _config(malformed_rows="skip"))[0]["answer"] == "1250"


def test_missing_file_and_bad_json_file_are_one_line_errors(tmp_path):
    missing = tmp_path / "nope" / "train.parquet"
    with pytest.raises(DataError, match=f"^data file not found: {missing}$"):
        load_rows(str(missing), _config())
    (tmp_path / "x.json").write_text('[{"problem": "a", "answer": "1"},\n {"problem": }]')
    with pytest.raises(DataError, match=r"x.json:2: bad JSON"):
        load_rows(str(tmp_path / "x.json"), _config())
    (tmp_path / "y.json").write_text('{"problem": "a", "answer": "1"}')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        load_rows(str(tmp_path / "y.json"), _config())


def test_hub_name_without_datasets_package_is_a_clear_error():
    try:
        import datasets  # noqa: F401

        pytest.skip("the datasets package is installed")
    except ImportError:
        pass
    with pytest.raises(DataError, match="`datasets` package is not installed"):
        load_rows("agentica-org/DeepScaleR-Preview-Dataset", _config())


def test_synthetic_sources():
    config = _config(synthetic_size=30, synthetic_difficulty=2, synthetic_seed=5)
    rows = load_rows("synthetic:countdown", config)
    expected = synthetic.countdown(30, 2, 5)
    assert [{k: r[k] for k in ("problem", "answer", "solution")} for r in rows] == expected
    assert {r["source"] for r in rows} == {"countdown"}
    with pytest.raises(ValueError, match="unknown synthetic task 'sudoku'"):
        load_rows("synthetic:sudoku", config)


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_carryfree_rows_never_carry_and_are_checked_by_the_maths_verifier(digits):
    from pacs_jax.rewards.math import score

    rows = load_rows("synthetic:carryfree", _config(synthetic_size=200, synthetic_difficulty=digits, synthetic_seed=3))
    assert [{k: r[k] for k in ("problem", "answer", "solution")} for r in rows] == synthetic.carryfree(200, digits, 3)
    assert {r["source"] for r in rows} == {"carryfree"}
    for row in rows:
        a, b = row["problem"].split("+")
        assert len(a) == len(b) == digits and (digits == 1 or a[0] != "0" and b[0] != "0")
        assert all(int(x) + int(y) <= 9 for x, y in zip(a, b))  # no column carries
        assert row["answer"] == str(int(a) + int(b))
        assert score(row["solution"], row["answer"]) == 1.0
    # Another seed draws (nearly) unseen problems: 108,900 distinct ones at 3 digits.
    if digits == 3:
        seen = {r["problem"] for r in synthetic.carryfree(4000, 3, 0)}
        assert sum(r["problem"] in seen for r in synthetic.carryfree(128, 3, 1)) <= 8


def test_source_names():
    assert source_name("/x/math500/test.jsonl") == "math500"
    assert source_name("/x/deepscaler.parquet") == "deepscaler"
    assert source_name("synthetic:arithmetic") == "arithmetic"
    assert source_name("org/name") == "org/name"


# ---------------------------------------------------------------------------- prompts


def _char_ids(text: str, bos: bool = False) -> list[int]:
    # Independent closed form of the char tokenizer: specials first, then the alphabet in order.
    return ([CHAR_SPECIALS.index("<bos>")] if bos else []) + [len(CHAR_SPECIALS) + CHAR_ALPHABET.index(c) for c in text]


def test_chat_prompts_filtering_and_errors():
    tokenizer = load_tokenizer("char")
    rows = [{"problem": "1+" * k + "1", "answer": str(k + 1), "source": "arith"} for k in range(20)]
    config = _config(instruction=" Box it.", max_prompt_tokens=40)
    examples, n_filtered = build_examples(rows, tokenizer, config)
    texts = [f"Q: {row['problem']} Box it.\nA: " for row in rows]
    kept = [i for i, text in enumerate(texts) if len(text) <= 40]
    assert n_filtered == len(rows) - len(kept) > 0
    assert [e.prompt_text for e in examples] == [texts[i] for i in kept]
    assert [e.prompt_ids for e in examples] == [_char_ids(texts[i]) for i in kept]
    assert [(e.answer, e.source, e.problem, e.solution) for e in examples] == [
        (rows[i]["answer"], "arith", rows[i]["problem"], None) for i in kept
    ]
    with pytest.raises(DataError, match=r"arith row \d+: prompt has \d+ tokens > data.max_prompt_tokens=40"):
        build_examples(rows, tokenizer, dataclasses.replace(config, overlong_prompts="error"))
    with pytest.raises(DataError, match="no usable prompts in arith: 20 rows, 20 longer"):
        build_examples(rows, tokenizer, dataclasses.replace(config, max_prompt_tokens=5))


def test_raw_template_adds_bos():
    tokenizer = load_tokenizer("char")
    rows = [{"problem": "23+58", "answer": "81", "source": "a", "solution": "\\boxed{81}"}]
    examples, _ = build_examples(rows, tokenizer, _config(prompt_template="{problem}=", instruction=""))
    assert examples[0].prompt_text == "23+58=" and examples[0].prompt_ids == _char_ids("23+58=", bos=True)
    assert examples[0].solution == "\\boxed{81}"
    with pytest.raises(DataError, match="data.prompt_template"):
        build_examples(rows, tokenizer, _config(prompt_template="{question}"))


def test_chat_prompt_with_a_hugging_face_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"])
    problems = [r["problem"] for r in _raw(DATA / "math500_test_50.jsonl")]
    backend.train_from_iterator(problems, trainer)
    template = "{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=template
    )
    hf.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(str(tmp_path))
    rows = load_rows(str(DATA / "math500_test_50.jsonl"), _config())[:10]
    config = _config(max_prompt_tokens=100_000)
    examples, n_filtered = build_examples(rows, tokenizer, config)
    assert n_filtered == 0
    for example, row in zip(examples, rows):
        expected = hf.apply_chat_template(
            [{"role": "user", "content": row["problem"] + config.instruction}], tokenize=False, add_generation_prompt=True
        )
        assert example.prompt_text == expected
        assert example.prompt_ids == hf.encode(expected, add_special_tokens=False)
        assert example.solution == row["solution"]


# ---------------------------------------------------------------------------- stream


def _examples(n: int) -> list:
    rows = [{"problem": str(i), "answer": str(i), "source": "s"} for i in range(n)]
    return build_examples(rows, load_tokenizer("char"), _config(prompt_template="{problem}"))[0]


def _answers(batch) -> list[int]:
    return [int(e.answer) for e in batch]


def test_prompt_stream_epochs_are_permutations_and_deterministic():
    examples = _examples(10)
    stream, twin = PromptStream(examples, seed=3), PromptStream(examples, seed=3)
    seen = [_answers(stream.next_batch(4)) for _ in range(10)]  # 40 prompts = 4 epochs
    assert seen == [_answers(twin.next_batch(4)) for _ in range(10)]
    flat = [a for batch in seen for a in batch]
    epochs = [flat[i : i + 10] for i in range(0, 40, 10)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled per epoch
    assert stream.state() == {"epoch": 3, "position": 10, "seed": 3, "num_examples": 10}
    other = PromptStream(examples, seed=4)
    assert [_answers(other.next_batch(10)) for _ in range(2)] != epochs[:2]
    plain = PromptStream(examples, shuffle=False)
    assert _answers(plain.next_batch(13)) == list(range(10)) + [0, 1, 2]


def test_prompt_stream_restore_resumes_the_same_order():
    examples = _examples(7)
    stream = PromptStream(examples, seed=11)
    stream.next_batch(5)
    stream.next_batch(5)  # mid-epoch 1
    saved = json.loads(json.dumps(stream.state()))  # as a checkpoint would store it
    expected = [_answers(stream.next_batch(3)) for _ in range(6)]
    resumed = PromptStream(examples, seed=11)
    resumed.restore(saved)
    assert [_answers(resumed.next_batch(3)) for _ in range(6)] == expected
    with pytest.raises(DataError, match="trainer.seed changed"):
        PromptStream(examples, seed=12).restore(saved)
    with pytest.raises(DataError, match="training data"):
        PromptStream(examples[:6], seed=11).restore(saved)
