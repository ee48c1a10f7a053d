"""Tokenizer backends against independent references: transformers on the real SmolLM2 folder,
sentencepiece itself on a model trained here, closed-form ids for the char tokenizer."""

import json
import random
import shutil
from pathlib import Path

import pytest

from pacs_jax.models.tokenizer import (
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
)

TEXTS = [
    "What is 2+3? Answer: \\boxed{5}",
    "Let $x^2 - 4x + 4 = 0$. Then (x-2)^2 = 0, so x = 2.\n\nDone.",
    "  leading spaces, trailing tabs\t\t and unicode: π ≈ 3.14159, ∑ über café",
    "",
]

# The Llama-2-chat template as Meta shipped it (system-prompt branch included).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


# ----- HF folder: the real SmolLM2-135M-Instruct -----


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_path):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(smollm2_path), local_files_only=True)
    return load_tokenizer(str(smollm2_path)), reference


@pytest.mark.smollm2
def test_hf_encode_decode_match_transformers(smollm2_pair):
    ours, reference = smollm2_pair
    assert isinstance(ours, HFTokenizer)
    assert ours.vocab_size == len(reference) == 49152
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    # Byte-level BPE: plain text round-trips exactly.
    for text in TEXTS:
        assert ours.decode(ours.encode(text)) == text
    assert ours.encode("x", add_bos=True) == [reference.bos_token_id, *reference.encode("x", add_special_tokens=False)]


@pytest.mark.smollm2
def test_hf_special_ids_and_chat_prompt(smollm2_pair):
    ours, reference = smollm2_pair
    im_end = reference.convert_tokens_to_ids("<|im_end|>")
    assert im_end in ours.eos_ids
    assert ours.eos_ids[0] == reference.eos_token_id
    assert ours.pad_id == reference.pad_token_id
    assert ours.bos_id == reference.bos_token_id
    message = "What is 7 * 6? Put the answer in \\boxed{}."
    expected = reference.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    assert ours.chat_prompt(message) == expected
    assert expected.endswith("<|im_start|>assistant\n") and message in expected


@pytest.mark.smollm2
def test_hf_generation_config_eos_list_and_template_override(smollm2_path, tmp_path):
    # A folder with tokenizer files but no chat template, and two stop tokens in generation_config.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_path / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    bare = load_tokenizer(str(tmp_path))
    assert bare.eos_ids == (2, 0)
    with pytest.raises(TokenizerError, match="model.chat_template"):
        bare.chat_prompt("hi")
    overridden = load_tokenizer(str(tmp_path), chat_template=LLAMA2_CHAT_TEMPLATE)
    assert overridden.chat_prompt(" hi ") == "<|im_start|>[INST] hi [/INST]"


# ----- sentencepiece: a model trained here -----


def _corpus(rng: random.Random, lines: int) -> list[str]:
    words = ["the", "sum", "of", "two", "and", "three", "is", "five", "answer", "boxed", "what",
             "number", "equals", "x", "y", "plus", "minus", "times", "[INST]", "[/INST]"]
    digits = [str(d) for d in range(10)]
    return [
        " ".join(rng.choice(words + digits) for _ in range(rng.randint(3, 12))) + rng.choice(["?", ".", "!"])
        for _ in range(lines)
    ]


@pytest.fixture(scope="module")
def sp_model_file(tmp_path_factory) -> Path:
    import sentencepiece

    folder = tmp_path_factory.mktemp("sp")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(0), 3000)),
        model_prefix=str(folder / "llama_style"),
        vocab_size=120,
        model_type="bpe",
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        minloglevel=2,
    )
    return folder / "llama_style.model"


def test_sentencepiece_round_trip_and_special_ids(sp_model_file):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_model_file))
    tokenizer = load_tokenizer(str(sp_model_file))
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_ids, tokenizer.pad_id) == (1, (2,), 3)
    assert tokenizer.vocab_size == reference.get_piece_size() == 120
    for text in _corpus(random.Random(1), 50):  # unseen sentences over the trained alphabet
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.encode(text, add_bos=True) == [1, *ids]
    # Control pieces in the text become their ids; decode drops them unless asked to keep them.
    ids = tokenizer.encode("<s>two plus 3</s>")
    assert ids == [1, *reference.encode("two plus 3"), 2]
    assert tokenizer.decode(ids) == "two plus 3"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>two plus 3</s>"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([5, 120])


def test_sentencepiece_chat_prompt_needs_a_template(sp_model_file):
    from transformers.utils.chat_template_utils import render_jinja_template

    with pytest.raises(TokenizerError, match="model.chat_template") as error:
        load_tokenizer(str(sp_model_file)).chat_prompt("what is 2 plus 3?")
    assert str(sp_model_file) in str(error.value)

    tokenizer = load_tokenizer(str(sp_model_file), chat_template=LLAMA2_CHAT_TEMPLATE)
    prompt = tokenizer.chat_prompt(" what is 2 plus 3? ")
    assert prompt == "<s>[INST] what is 2 plus 3? [/INST]"
    # transformers' own renderer agrees on the same template and special tokens.
    rendered, _ = render_jinja_template(
        conversations=[[{"role": "user", "content": " what is 2 plus 3? "}]],
        chat_template=LLAMA2_CHAT_TEMPLATE, add_generation_prompt=True, bos_token="<s>", eos_token="</s>",
    )
    assert prompt == rendered[0]
    assert tokenizer.encode(prompt)[0] == tokenizer.bos_id


# ----- char -----


def test_char_tokenizer_round_trips_every_printable_character():
    tokenizer = load_tokenizer("char")
    assert isinstance(tokenizer, CharTokenizer)
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_ids) == (0, 1, (2,))
    assert tokenizer.vocab_size == 128
    alphabet = "".join(chr(c) for c in range(32, 127)) + "\n"
    ids = tokenizer.encode(alphabet)
    assert ids == [3 + ord(c) - 32 for c in alphabet[:-1]] + [98]  # closed form of the id layout
    assert tokenizer.decode(ids) == alphabet
    assert tokenizer.encode("7*6", add_bos=True) == [1, 3 + ord("7") - 32, 3 + ord("*") - 32, 3 + ord("6") - 32]
    assert tokenizer.decode([1, 3 + ord("a") - 32, 2, 0]) == "a"
    assert tokenizer.decode([1, 3 + ord("a") - 32, 2, 0], skip_special_tokens=False) == "<bos>a<eos><pad>"
    assert tokenizer.encode("a<eos>") == [3 + ord("a") - 32, 2]
    with pytest.raises(TokenizerError, match="printable ASCII"):
        tokenizer.encode("café")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tokenizer.decode([128])


def test_char_chat_prompt_builtin_and_override():
    assert load_tokenizer("char").chat_prompt("12+30=?") == "Q: 12+30=?\nA: "
    custom = load_tokenizer("char", chat_template="{{ messages[0]['content'] }} =")
    assert custom.chat_prompt("1+1") == "1+1 ="


# ----- bad specs -----


def test_bad_specs_name_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(TokenizerError, match="does not exist") as error:
        load_tokenizer(str(missing))
    assert str(missing) in str(error.value)

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="tokenizer.json") as error:
        load_tokenizer(str(empty))
    assert str(empty) in str(error.value)

    text_file = tmp_path / "vocab.txt"
    text_file.write_text("a b c")
    with pytest.raises(TokenizerError, match="sentencepiece .model") as error:
        load_tokenizer(str(text_file))
    assert str(text_file) in str(error.value)

    corrupt = tmp_path / "broken.model"
    corrupt.write_bytes(b"not a protobuf")
    with pytest.raises(TokenizerError, match="sentencepiece") as error:
        load_tokenizer(str(corrupt))
    assert str(corrupt) in str(error.value)
