"""Tokenizers behind one small interface: HF folders, sentencepiece .model files, and "char".

    tokenizer = load_tokenizer("path/to/hf_folder")          # tokenizer.json / tokenizer_config.json
    tokenizer = load_tokenizer("llama2.model", chat_template=LLAMA2_TEMPLATE)
    tokenizer = load_tokenizer("char")                        # synthetic CPU debug tasks

Every backend exposes `vocab_size`, `eos_ids` (all stop tokens), `pad_id`, `bos_id` (or None),
`encode`, `decode` and `chat_prompt`. `chat_prompt` returns text that already holds whatever
BOS / special markers the template writes, so encode it with add_bos=False.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

# The built-in character tokenizer: specials first, then printable ASCII and newline.
CHAR_SPECIALS = ("<pad>", "<bos>", "<eos>")
CHAR_ALPHABET = "".join(chr(code) for code in range(32, 127)) + "\n"
# Rounded up to a power of two so the embedding shards evenly; ids past the alphabet are unused.
CHAR_VOCAB_SIZE = 128
CHAR_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "Q: {{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class TokenizerError(ValueError):
    """A tokenizer spec or call is wrong; the message names the path or key and the fix."""


class Tokenizer:
    """The interface the data pipeline, sampler and verifier use; subclasses fill it in."""

    vocab_size: int
    eos_ids: tuple[int, ...]
    pad_id: int
    bos_id: Optional[int]

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in the text become their ids, nothing is added
        except BOS when asked."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. It does not stop at EOS: the caller cuts the response first."""
        raise NotImplementedError

    def chat_prompt(self, user_message: str, system: str = "", template_kwargs: Optional[dict] = None) -> str:
        """One user turn (after a system message when `system` is set) rendered by the chat template,
        ending where the assistant's reply starts. `template_kwargs` are extra variables for the
        template (data.chat_template_kwargs), e.g. Qwen3's {"enable_thinking": False}."""
        raise NotImplementedError

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise TokenizerError("this tokenizer has no BOS token; call encode with add_bos=False")
        return [self.bos_id, *ids]


def load_tokenizer(spec: str, chat_template: str = "") -> Tokenizer:
    """A tokenizer from an HF folder, a sentencepiece .model file, or "char".

    `chat_template` (Jinja, config key `model.chat_template`) overrides the folder's template and
    is required for sentencepiece files, which carry none.
    """
    if spec == "char":
        return CharTokenizer(chat_template or CHAR_CHAT_TEMPLATE)
    path = Path(spec).expanduser()
    if path.is_dir():
        return HFTokenizer(path, chat_template)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path, chat_template)
    expected = (
        'expected "char", a Hugging Face folder with tokenizer.json / tokenizer_config.json, '
        "or a sentencepiece .model file (config key model.tokenizer)"
    )
    if not path.exists():
        raise TokenizerError(f"tokenizer {spec!r}: {path} does not exist; {expected}")
    raise TokenizerError(f"tokenizer {spec!r}: {path} is not a folder or a .model file; {expected}")


def chat_messages(user_message: str, system: str = "") -> list[dict]:
    """The conversation of a prompt: an optional system message, then one user turn."""
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": user_message}]


def render_chat_template(template: str, user_message: str, system: str = "", template_kwargs: Optional[dict] = None,
                         **special_tokens: str) -> str:
    """Render one user turn (after `system`, when set) with add_generation_prompt=True, the way
    transformers renders templates (sandboxed Jinja, trim_blocks, lstrip_blocks, loop controls,
    raise_exception); `template_kwargs` become template variables, as apply_chat_template's kwargs."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template).render(
        messages=chat_messages(user_message, system),
        add_generation_prompt=True,
        **{**(template_kwargs or {}), **special_tokens},
    )


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer folder, loaded with transformers from local files only."""

    def __init__(self, folder: Path, chat_template: str = ""):
        if not any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
            raise TokenizerError(
                f"tokenizer folder {folder} has neither {' nor '.join(HF_TOKENIZER_FILES)}; point "
                "model.tokenizer at a Hugging Face model folder, a sentencepiece .model file or \"char\""
            )
        from transformers import AutoTokenizer

        self.folder = folder
        self._hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if chat_template:
            self._hf.chat_template = chat_template
        tokenizer_eos = [] if self._hf.eos_token_id is None else [self._hf.eos_token_id]
        self.eos_ids = _unique([*tokenizer_eos, *_generation_eos_ids(folder)])
        if not self.eos_ids:
            raise TokenizerError(
                f"{folder} defines no eos_token (tokenizer_config.json) and no eos_token_id "
                "(generation_config.json); generation could not stop"
            )
        self.vocab_size = len(self._hf)  # includes added tokens, unlike `.vocab_size`
        self.pad_id = self._hf.pad_token_id if self._hf.pad_token_id is not None else self.eos_ids[0]
        self.bos_id = self._hf.bos_token_id

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return self._with_bos(list(self._hf.encode(text, add_special_tokens=False)), add_bos)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, user_message: str, system: str = "", template_kwargs: Optional[dict] = None) -> str:
        if not self._hf.chat_template:
            raise TokenizerError(
                f"tokenizer in {self.folder} has no chat template; set model.chat_template (Jinja) "
                "or use a raw data.prompt_template"
            )
        # tokenize=False: transformers 5 returns a BatchEncoding when tokenizing; we want the text.
        return self._hf.apply_chat_template(
            chat_messages(user_message, system), tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
        )


def _split_on_specials(text: str, special_ids: dict[str, int]) -> list[str | int]:
    """`text` cut into plain chunks (str) and the ids of special-token strings found in it (int)."""
    if not special_ids:
        return [text]
    longest_first = sorted(special_ids, key=len, reverse=True)
    pattern = "(" + "|".join(re.escape(piece) for piece in longest_first) + ")"
    # re.split with a capture group puts the matched specials at the odd positions.
    return [
        special_ids[chunk] if i % 2 else chunk
        for i, chunk in enumerate(re.split(pattern, text))
        if i % 2 or chunk
    ]


def _generation_eos_ids(folder: Path) -> list[int]:
    """Extra stop tokens from generation_config.json (chat models stop at e.g. <|im_end|>)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


def _unique(ids: Sequence[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(int(i) for i in ids))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece .model file (Llama-2 style: BOS, EOS, optional pad), used directly."""

    def __init__(self, model_file: Path, chat_template: str = ""):
        import sentencepiece

        self.model_file = model_file
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{model_file} is not a readable sentencepiece model: {err}") from err
        if self._sp.eos_id() < 0:
            raise TokenizerError(f"sentencepiece model {model_file} has no EOS piece; generation could not stop")
        self.chat_template = chat_template
        self.vocab_size = self._sp.get_piece_size()
        self.eos_ids = (self._sp.eos_id(),)
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.eos_id()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        # Control pieces (<s>, </s>, <pad>) written by a chat template must encode to their ids, as
        # HF tokenizers do; sentencepiece alone would spell them out character by character.
        self._control_ids = {
            self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)
        }

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids: list[int] = []
        for chunk in _split_on_specials(text, self._control_ids):
            ids.extend([chunk] if isinstance(chunk, int) else self._sp.encode(chunk))
        return self._with_bos(ids, add_bos)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if skip_special_tokens:
            return self._sp.decode(ids)  # sentencepiece drops control pieces itself
        # Keep control pieces as their text, decoding the ordinary runs between them.
        parts, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                parts.extend([self._sp.decode(run), self._sp.id_to_piece(i)])
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def chat_prompt(self, user_message: str, system: str = "", template_kwargs: Optional[dict] = None) -> str:
        if not self.chat_template:
            raise TokenizerError(
                f"sentencepiece model {self.model_file} carries no chat template; set "
                "model.chat_template (Jinja, e.g. a Llama-2 [INST] template) or use a raw "
                "data.prompt_template"
            )
        return render_chat_template(
            self.chat_template,
            user_message,
            system,
            template_kwargs,
            bos_token=self._sp.id_to_piece(self.bos_id) if self.bos_id is not None else "",
            eos_token=self._sp.id_to_piece(self.eos_ids[0]),
        )


class CharTokenizer(Tokenizer):
    """One id per character, for the synthetic CPU debug tasks (no files, no training)."""

    def __init__(self, chat_template: str = CHAR_CHAT_TEMPLATE):
        self.chat_template = chat_template
        self.vocab_size = CHAR_VOCAB_SIZE
        self.pad_id, self.bos_id, eos_id = range(len(CHAR_SPECIALS))
        self.eos_ids = (eos_id,)
        self._id_of = {char: len(CHAR_SPECIALS) + i for i, char in enumerate(CHAR_ALPHABET)}
        self._char_of = {i: char for char, i in self._id_of.items()}

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids: list[int] = []
        for chunk in _split_on_specials(text, {piece: i for i, piece in enumerate(CHAR_SPECIALS)}):
            if isinstance(chunk, int):
                ids.append(chunk)
                continue
            unknown = sorted(set(chunk) - self._id_of.keys())
            if unknown:
                raise TokenizerError(
                    f"the char tokenizer covers printable ASCII and newline only; text has {unknown[:5]}"
                )
            ids.extend(self._id_of[char] for char in chunk)
        return self._with_bos(ids, add_bos)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        chars = []
        for i in (int(i) for i in ids):
            if i in self._char_of:
                chars.append(self._char_of[i])
            elif not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            elif not skip_special_tokens:
                chars.append(CHAR_SPECIALS[i] if i < len(CHAR_SPECIALS) else f"<unused{i}>")
        return "".join(chars)

    def chat_prompt(self, user_message: str, system: str = "", template_kwargs: Optional[dict] = None) -> str:
        return render_chat_template(
            self.chat_template, user_message, system, template_kwargs, bos_token=CHAR_SPECIALS[1], eos_token=CHAR_SPECIALS[2]
        )
