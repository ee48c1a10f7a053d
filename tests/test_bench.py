"""The benchmarks run end to end on the tiny model and write the JSON their docs describe; the
decode loop the decode profile times computes what transformers computes (float64). Speed is never
asserted here: bench/ measures it."""

import json
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

REPO = Path(__file__).resolve().parents[1]


def test_rollout_bench_tiny_groups_and_prefill_split(tmp_path):
    from bench import rollout

    out = tmp_path / "rollout.json"
    payload = rollout.main(["--models", "tiny", "--batch", "8", "--group", "4", "--new-tokens", "6", "--repeats", "1",
                            "--top-p", "0.9", "--decode-layers", "unrolled", "scan", "--out", str(out)])
    row = payload["results"][0]
    assert (row["batch"], row["prompts"], row["group"]) == (8, 2, 4)
    assert payload["sampling"]["top_p"] == 0.9
    assert (row["ours"]["decode_layers"], row["ours_scan"]["decode_layers"]) == ("unrolled", "scan")
    assert row["speedup_vs_ours_scan"] == pytest.approx(row["ours"]["tokens_per_s"] / row["ours_scan"]["tokens_per_s"])
    for side in ("ours", "ours_scan", "transformers"):
        assert row[side]["tokens_per_s"] == pytest.approx(8 * 6 / row[side]["steady_s"])
        assert 0 < row[side]["first_token_s"]
    assert json.loads(out.read_text())["results"][0]["speedup_vs_transformers"] == pytest.approx(row["speedup_vs_transformers"])


def test_rollout_bench_rejects_a_batch_that_is_not_whole_groups(tmp_path, capsys):
    from bench import rollout

    with pytest.raises(SystemExit):
        rollout.main(["--models", "tiny", "--batch", "6", "--group", "4", "--out", str(tmp_path / "r.json")])
    assert "--batch 6 is not a multiple of --group 4" in capsys.readouterr().err


def test_decode_profile_tiny_runs_and_writes_every_timing(tmp_path):
    from bench import decode_profile

    has_git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode == 0
    payload = decode_profile.main(["--model", "tiny", "--batch", "4", "--cache-len", "24", "--prompt-len", "16", "--steps", "2",
                                   "--repeats", "1", "--baseline-rev", "HEAD" if has_git else "", "--out", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text())["per_step_ms"] == payload["per_step_ms"]
    names = set(payload["per_step_ms"])
    assert {"decoder_with_cache, scanned layers (generate on TPU/GPU)", "decoder_with_cache, unrolled layers (generate on CPU)",
            "sample_token top_p 0.95", "sort-based filter top_p 0.95 (baseline)"} <= names
    assert all(ms > 0 for ms in payload["per_step_ms"].values())
    assert payload["unrolled_vs_scanned_max_abs_hidden_diff"] < 1e-4


@pytest.mark.parametrize("layers", ["scan", "unrolled"])
def test_decode_profile_loop_matches_transformers_float64(tmp_path, layers):
    """What the profile times is the real decode: a prefilled cache, then `steps` cached decode
    steps, ends in the final hidden state transformers (float64, the whole sequence at once) gives
    for the same tokens."""
    from bench import decode_profile
    from bench.common import make_tiny_hf_folder

    from pacs_jax.models import from_pretrained
    from pacs_jax.models.llama import KVCache

    folder = make_tiny_hf_folder(tmp_path / "tiny")
    model = from_pretrained(folder, dtype="float32")
    config = model.config
    graphdef, state = nnx.split(model)
    batch, prompt_len, cache_len, steps = 3, 16, 24, 5
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, config.vocab_size, (batch, prompt_len))
    cache_mask = jnp.ones((batch, cache_len), jnp.int32)
    token = jnp.full((batch, 1), 7, jnp.int32)
    cache = decode_profile.prefilled_cache(graphdef, state, KVCache, config, jnp.asarray(prompt, jnp.int32), cache_mask)
    loop = decode_profile.decode_loop(graphdef, config, cache_mask, token, prompt_len, steps, layers=layers)
    hidden = np.asarray(loop(state, cache))[:, 0]

    fed = (7 + np.arange(steps)) % config.vocab_size  # the tokens the loop feeds, one per step
    sequence = torch.tensor(np.concatenate([prompt, np.tile(fed, (batch, 1))], axis=1))
    hf_model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    with torch.no_grad():
        expected = hf_model(sequence, output_hidden_states=True).hidden_states[-1][:, -1].numpy()  # after the final norm
    np.testing.assert_allclose(hidden, expected, atol=2e-4, rtol=1e-4)
