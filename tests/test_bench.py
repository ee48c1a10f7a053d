"""The benchmarks run end to end on the tiny model and write the JSON their docs describe, and
their built-in parity checks hold. Speed is never asserted here: bench/ measures it."""

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("torch")

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


def test_decode_profile_tiny_against_the_committed_decoder(tmp_path):
    from bench import decode_profile

    has_git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode == 0
    payload = decode_profile.main(["--model", "tiny", "--batch", "4", "--cache-len", "24", "--prompt-len", "16", "--steps", "2",
                                   "--repeats", "1", "--baseline-rev", "HEAD" if has_git else "", "--out", str(tmp_path / "d.json")])
    if has_git:  # the bench copied the same weights into the baseline module (correctness vs transformers: test_models)
        assert payload["baseline_max_abs_hidden_diff"] < 1e-4
    assert payload["unrolled_vs_scanned_max_abs_hidden_diff"] < 1e-4
    names = set(payload["per_step_ms"])
    assert {"decoder_with_cache, scanned layers (generate on TPU/GPU)", "decoder_with_cache, unrolled layers (generate on CPU)",
            "sample_token top_p 0.95", "sort-based filter top_p 0.95 (baseline)"} <= names
    assert all(ms > 0 for ms in payload["per_step_ms"].values())
