"""Passing I/O failures at a run's start are retried inside the trainer, and only a config error
exits with status 2 (launch/spot_loop.sh stops on 2, and starts the run again on anything else):
a 503 from `gcloud storage cp` (a fake gcloud on PATH that plays gcloud's real error lines) and a
Hugging Face dataset download that loses its connection."""

import os
import sys
import types
from pathlib import Path

import pytest
import requests

from pacs_jax import gcs
from pacs_jax.__main__ import main
from pacs_jax.config import ConfigError

# `gcloud storage cp -r gs://B/P DEST/`, served from $FAKE_BUCKETS; the first $FAKE_FAILS calls fail
# with $FAKE_ERROR (gcloud's own wording), the rest copy.
FAKE_GCLOUD = r'''#!/usr/bin/env bash
echo "$*" >> "$FAKE_BUCKETS/calls"
[[ $1 == storage && $2 == cp ]] || exit 3
n=$(wc -l < "$FAKE_BUCKETS/calls")
if (( n <= ${FAKE_FAILS:-0} )); then echo "$FAKE_ERROR" >&2; exit 1; fi
src="$FAKE_BUCKETS/${4#gs://}"
[[ -e $src ]] || { echo "ERROR: (gcloud.storage.cp) The following URLs matched no objects or files: $4" >&2; exit 1; }
cp -r "$src" "$5"
'''
UNAVAILABLE = ("ERROR: (gcloud.storage.cp) HTTPError 503: We encountered an internal error. Please try again.")
FORBIDDEN = ("ERROR: (gcloud.storage.cp) HTTPError 403: tpu@p.iam.gserviceaccount.com does not have "
             "storage.objects.list access to the Google Cloud Storage bucket.")
TINY = ["model.tokenizer=char", "model.arch={hidden_size: 8, intermediate_size: 16, num_hidden_layers: 1, "
        "num_attention_heads: 2, num_key_value_heads: 1}", "trainer.total_steps=1"]


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    root = tmp_path / "buckets"
    (root / "b" / "data").mkdir(parents=True)
    (root / "b" / "data" / "train.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    (root / "calls").write_text("")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "gcloud").write_text(FAKE_GCLOUD)
    (tmp_path / "bin" / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_BUCKETS", str(root))
    monkeypatch.setenv("PACS_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PACS_JAX_IO_RETRY_SECONDS", "0")
    monkeypatch.setenv("PACS_JAX_IO_TRIES", "4")
    return root


def train_argv(tmp_path: Path, *overrides: str) -> list[str]:
    """`python -m pacs_jax train` of a tiny config (an empty YAML file and overrides)."""
    config = tmp_path / "tiny.yaml"
    config.write_text("{}\n")
    return ["train", "--config", str(config), *TINY, *overrides, f"trainer.run_dir={tmp_path / 'run'}"]


def copies(root: Path) -> int:
    return len((root / "calls").read_text().splitlines())


def test_a_503_is_retried_until_the_copy_succeeds(bucket, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_FAILS", "3")
    monkeypatch.setenv("FAKE_ERROR", UNAVAILABLE)
    local = gcs.local_copy("gs://b/data/train.jsonl", "data.train")
    assert local.read_text().startswith('{"problem": "1+1"') and copies(bucket) == 4
    assert "HTTPError 503" in capsys.readouterr().out  # each failed try is reported
    assert not local.with_name(local.name + ".partial").exists()


def test_a_503_that_outlasts_its_retries_is_not_a_config_error(bucket, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FAKE_FAILS", "100")
    monkeypatch.setenv("FAKE_ERROR", UNAVAILABLE)
    with pytest.raises(gcs.TransientIOError, match="failed 4 times.*HTTPError 503"):
        gcs.local_copy("gs://b/data/train.jsonl", "data.train")
    # Through the CLI: exit status 75 (EX_TEMPFAIL), on which the spot loop starts the run again.
    status = main(train_argv(tmp_path, "data.train=gs://b/data/train.jsonl"))
    assert status == gcs.TRANSIENT_EXIT_STATUS == 75
    assert "a passing I/O failure: exit status 75" in capsys.readouterr().err
    assert copies(bucket) == 8


def test_a_missing_object_or_no_permission_is_a_config_error_at_once(bucket, monkeypatch, tmp_path, capsys):
    with pytest.raises(ConfigError, match="matched no objects"):
        gcs.local_copy("gs://b/data/nope.jsonl", "data.train")
    assert copies(bucket) == 1
    monkeypatch.setenv("FAKE_FAILS", "100")
    monkeypatch.setenv("FAKE_ERROR", FORBIDDEN)
    status = main(train_argv(tmp_path, "data.train=gs://b/data/train.jsonl"))
    assert status == 2 and copies(bucket) == 2  # no retry
    assert "roles/storage.objectViewer" in capsys.readouterr().err


class FlakyHub:
    """datasets.load_dataset that fails `fails` times the way a dropped connection or a 503 does.
    (`datasets` is a TPU-worker requirement, not a test one: the module is stood in for.)"""

    def __init__(self, fails: int, error: Exception):
        self.fails, self.error, self.calls = fails, error, 0

    def __call__(self, name, split):
        self.calls += 1
        if self.calls <= self.fails:
            raise self.error
        return [{"problem": "What is 2+3?", "answer": "5"}]


class DatasetNotFoundError(FileNotFoundError):
    """As datasets.exceptions.DatasetNotFoundError: a FileNotFoundError."""


def use_hub(monkeypatch, flaky: FlakyHub) -> None:
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=flaky))


def http_error(status: int) -> Exception:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} Server Error", response=response)


def test_hub_dataset_download_is_retried(monkeypatch):
    from pacs_jax.config import load_config
    from pacs_jax.data import load_rows

    monkeypatch.setenv("PACS_JAX_IO_RETRY_SECONDS", "0")
    monkeypatch.setenv("PACS_JAX_IO_TRIES", "3")
    data_config = load_config(None, TINY).data
    for error in (requests.ConnectionError("Connection aborted."), http_error(503), TimeoutError("read timed out")):
        flaky = FlakyHub(2, error)
        use_hub(monkeypatch, flaky)
        rows = load_rows("someone/math", data_config)
        assert [r["answer"] for r in rows] == ["5"] and flaky.calls == 3


def test_hub_failures_exit_75_when_passing_and_2_when_not(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PACS_JAX_IO_RETRY_SECONDS", "0")
    monkeypatch.setenv("PACS_JAX_IO_TRIES", "2")
    argv = train_argv(tmp_path, "data.train=someone/math")
    down = FlakyHub(100, http_error(503))
    use_hub(monkeypatch, down)
    assert main(argv) == 75 and down.calls == 2
    missing = FlakyHub(100, DatasetNotFoundError("Dataset 'someone/math' doesn't exist on the Hub"))
    use_hub(monkeypatch, missing)
    assert main(argv) == 2 and missing.calls == 1
    assert "cannot load Hugging Face dataset 'someone/math'" in capsys.readouterr().err
    private = FlakyHub(100, http_error(401))
    use_hub(monkeypatch, private)
    assert main(argv) == 2 and private.calls == 1
