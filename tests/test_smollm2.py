"""The real SmolLM2-135M-Instruct against transformers (PyTorch, CPU, float32): batched left-padded
logits, a greedy chat continuation with <|im_end|> as the stop token, and the HF export round trip.

The tiny random configs in test_models.py / test_rollout.py cover every layout switch; this file
checks that nothing breaks at real scale (30 layers, 49k vocabulary, GQA 9/3, tied embeddings,
rope_theta 1e5) with real weights and the real tokenizer and chat template.
"""

import jax
import numpy as np
import pytest

import torch  # noqa: E402
import transformers  # noqa: E402

from pacs_jax.models import from_pretrained, save_pretrained  # noqa: E402
from pacs_jax.models.smollm2 import STOP_TOKEN  # noqa: E402
from pacs_jax.models.tokenizer import load_tokenizer  # noqa: E402
from pacs_jax.sampler import SamplingParams, generate, pad_prompts  # noqa: E402

pytestmark = pytest.mark.smollm2

# Different lengths on purpose: the batch is left-padded, so rows sit at different offsets.
QUESTIONS = (
    "What is 2 + 3?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Name a prime number larger than 10.",
)
NEW_TOKENS = 32


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On 2 shared cores torch's OpenMP threads spin at barriers while JAX computes: 1 thread is
    up to 10x faster there (bench/RESULTS.md). Restored afterwards for other test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return load_tokenizer(str(smollm2_path))


@pytest.fixture(scope="module")
def hf_model(smollm2_path):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(smollm2_path):
    return from_pretrained(smollm2_path, dtype="float32")


@pytest.fixture(scope="module")
def chat_prompts(tokenizer):
    return [tokenizer.encode(tokenizer.chat_prompt(q)) for q in QUESTIONS]


def hf_logits_unpadded(hf_model, prompt: list[int]) -> np.ndarray:
    """The reference: one prompt alone, no padding, so HF's positions and masks are the plain ones."""
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([prompt])).logits[0].numpy()


def test_batched_left_padded_logits_match_transformers(model, hf_model, chat_prompts):
    ids, mask = pad_prompts(chat_prompts, [64, 128], pad_id=0)
    assert len({len(p) for p in chat_prompts}) == len(chat_prompts)  # padding differs per row
    logits = np.asarray(jax.jit(lambda m, i, a: m(i, attention_mask=a))(model, ids, mask))
    assert logits.shape == (len(chat_prompts), ids.shape[1], 49152) and logits.dtype == np.float32
    for row, prompt in enumerate(chat_prompts):
        expected = hf_logits_unpadded(hf_model, prompt)
        ours = logits[row, ids.shape[1] - len(prompt):]
        error = np.max(np.abs(ours - expected))
        assert error < 1e-3, (row, error)
        # Logits spread over tens of units, so the bound above is a tight relative one too.
        assert np.ptp(expected) > 10.0


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_greedy_chat_continuation_matches_transformers_generate(model, hf_model, tokenizer, chat_prompts, layers):
    stop_id = tokenizer.encode(STOP_TOKEN)
    assert stop_id == [hf_model.generation_config.eos_token_id]  # the folder says <|im_end|> stops
    stop_id = stop_id[0]
    pad_id = tokenizer.pad_id

    width = max(len(p) for p in chat_prompts)
    hf_ids = torch.full((len(chat_prompts), width), pad_id)
    hf_mask = torch.zeros((len(chat_prompts), width), dtype=torch.long)
    for row, prompt in enumerate(chat_prompts):
        hf_ids[row, width - len(prompt):] = torch.tensor(prompt)
        hf_mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        hf_out = hf_model.generate(
            input_ids=hf_ids, attention_mask=hf_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=stop_id, pad_token_id=pad_id,
        )[:, width:].numpy()

    ids, mask = pad_prompts(chat_prompts, [64, 128], pad_id=pad_id)
    params = SamplingParams(NEW_TOKENS, temperature=0.0, stop_ids=(stop_id,), pad_id=pad_id, decode_layers=layers)
    out = generate(model, ids, mask, jax.random.key(0), params)
    response, response_mask = np.asarray(out.response_ids), np.asarray(out.response_mask)

    stopped = 0
    for row in range(len(chat_prompts)):
        want = list(hf_out[row])
        if stop_id in want:
            want = want[: want.index(stop_id) + 1]
            stopped += 1
        got = list(response[row][response_mask[row] == 1])
        assert got == want, (row, tokenizer.decode(got), tokenizer.decode(want))
        assert int(out.lengths[row]) == len(want)
    # The continuation is real text, not a degenerate repeat of one token, and the stop token is
    # exercised: the short questions end with <|im_end|> inside 32 tokens, the long one does not.
    first = tokenizer.decode(response[0][response_mask[0] == 1])
    assert len(set(response[0][response_mask[0] == 1].tolist())) > 3, first
    assert 0 < stopped < len(chat_prompts)
    assert int(out.decode_steps) == NEW_TOKENS


def test_export_round_trip_loads_in_transformers_with_identical_logits(model, hf_model, chat_prompts, smollm2_path, tmp_path):
    folder = save_pretrained(model, tmp_path / "export", tokenizer_dir=smollm2_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    original = dict(hf_model.state_dict())
    exported = dict(reloaded.state_dict())
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    for prompt in chat_prompts:
        np.testing.assert_array_equal(hf_logits_unpadded(reloaded, prompt), hf_logits_unpadded(hf_model, prompt))
    # The copied tokenizer files make the export a complete chat model folder.
    exported_tokenizer = load_tokenizer(str(folder))
    assert exported_tokenizer.encode(exported_tokenizer.chat_prompt(QUESTIONS[0])) == chat_prompts[0]
