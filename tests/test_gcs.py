"""gs:// model and data paths: copied once per machine into the cache, through a fake `gcloud`
on PATH that serves a folder as the bucket and records its calls."""

import os
from pathlib import Path

import pytest

from pacs_jax import gcs
from pacs_jax.config import ConfigError, load_config

FAKE_GCLOUD = r'''#!/usr/bin/env bash
# gcloud storage cp -r gs://BUCKET/PATH DEST/ from the folder $FAKE_BUCKETS; every call recorded.
echo "$*" >> "$FAKE_BUCKETS/calls"
[[ $1 == storage && $2 == cp && $3 == -r ]] || exit 3
src="$FAKE_BUCKETS/${4#gs://}"
[[ -e $src ]] || { echo "ERROR: (gcloud.storage.cp) The following URLs matched no objects or files: $4" >&2; exit 1; }
cp -r "$src" "$5"
'''


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    root = tmp_path / "buckets"
    (root / "b" / "models" / "tiny").mkdir(parents=True)
    (root / "b" / "models" / "tiny" / "config.json").write_text("{}")
    (root / "b" / "data").mkdir()
    (root / "b" / "data" / "train.jsonl").write_text('{"problem": "1+1", "answer": "2"}\n')
    (root / "b" / "data" / "val.jsonl").write_text('{"problem": "2+2", "answer": "4"}\n')
    (root / "calls").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_BUCKETS", str(root))
    monkeypatch.setenv("PACS_JAX_CACHE", str(tmp_path / "cache"))
    return root


def copies(root: Path) -> list[str]:
    return (root / "calls").read_text().splitlines()


def test_inputs_copied_once_per_machine(bucket, tmp_path):
    overrides = ["model.path=gs://b/models/tiny", "data.train=gs://b/data/train.jsonl",
                 "data.val={v: gs://b/data/val.jsonl}"]
    config = load_config(None, overrides)
    staged = gcs.stage_inputs(config)
    cache = tmp_path / "cache" / "gcs" / "b"
    assert staged.model.path == str(cache / "models" / "tiny")
    assert (cache / "models" / "tiny" / "config.json").read_text() == "{}"
    assert staged.data.train == str(cache / "data" / "train.jsonl")
    assert Path(staged.data.train).read_text().startswith('{"problem": "1+1"')
    # Validation is off (trainer.eval_every=0): its files are not fetched.
    assert staged.data.val == {"v": "gs://b/data/val.jsonl"}
    assert len(copies(bucket)) == 2
    # A second start on the same machine (a resumed run) copies nothing.
    assert gcs.stage_inputs(config) == staged
    assert len(copies(bucket)) == 2

    validating = load_config(None, [*overrides, "trainer.eval_every=10"])
    assert gcs.stage_inputs(validating).data.val == {"v": str(cache / "data" / "val.jsonl")}
    assert len(copies(bucket)) == 3


def test_interrupted_copy_is_fetched_again(bucket, tmp_path):
    dest = tmp_path / "cache" / "gcs" / "b" / "models" / "tiny"
    dest.mkdir(parents=True)  # a copy cut short: no .complete marker
    assert gcs.local_copy("gs://b/models/tiny", "model.path") == dest
    assert (dest / "config.json").is_file() and len(copies(bucket)) == 1


def test_missing_object_names_the_key(bucket):
    with pytest.raises(ConfigError, match=r"model.path=gs://b/models/nope: copying it failed .*matched no objects"):
        gcs.stage_inputs(load_config(None, ["model.path=gs://b/models/nope"]))


def test_no_gcloud_names_the_key(bucket, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="data.train=gs://b/data/train.jsonl needs the gcloud CLI"):
        gcs.stage_inputs(load_config(None, ["model.tokenizer=char", "model.arch={hidden_size: 8}", "data.train=gs://b/data/train.jsonl"]))


def test_remote_run_keeps_tensorboard_events_and_wandb_id(tmp_path, monkeypatch):
    """A gs:// run's local logs go to the bucket at each checkpoint and come back on a new VM:
    metrics, config, the W&B run id (so the same W&B run goes on) and the TensorBoard events.
    The bucket is a local folder here (epath on gs:// mapped onto it)."""
    from pacs_jax import run_files

    bucket = tmp_path / "bucket"

    class FakeEpath:
        @staticmethod
        def Path(path):
            path = str(path)
            return bucket / path.removeprefix("gs://") if path.startswith("gs://") else Path(path)

    monkeypatch.setattr(run_files, "epath", FakeEpath)
    first_vm = tmp_path / "vm1"
    (first_vm / "tensorboard").mkdir(parents=True)
    (first_vm / "tensorboard" / "events.out.tfevents.1.vm1").write_bytes(b"\x00events")
    (first_vm / "metrics.jsonl").write_text('{"step": 1}\n')
    (first_vm / "config.yaml").write_text("trainer: {}\n")
    (first_vm / "wandb_run_id").write_text("abc123\n")
    run_files.upload_logs(first_vm, "gs://b/runs/x", main=True)
    assert (bucket / "b/runs/x/tensorboard/events.out.tfevents.1.vm1").read_bytes() == b"\x00events"

    second_vm = tmp_path / "vm2"  # the preempted VM is gone; the new one starts empty
    second_vm.mkdir()
    run_files.download_logs("gs://b/runs/x", second_vm)
    assert (second_vm / "wandb_run_id").read_text() == "abc123\n"
    assert (second_vm / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (second_vm / "tensorboard" / "events.out.tfevents.1.vm1").read_bytes() == b"\x00events"
    # Its own session's events join them at the next upload; nothing of the first is lost.
    (second_vm / "tensorboard" / "events.out.tfevents.2.vm2").write_bytes(b"more")
    run_files.upload_logs(second_vm, "gs://b/runs/x", main=True)
    assert sorted(p.name for p in (bucket / "b/runs/x/tensorboard").iterdir()) == [
        "events.out.tfevents.1.vm1", "events.out.tfevents.2.vm2"]
    # Other processes upload nothing.
    run_files.upload_logs(second_vm, "gs://b/runs/y", main=False)
    assert not (bucket / "b/runs/y").exists()


def test_eval_inputs_on_gs_are_copied_too(bucket, tmp_path):
    from pacs_jax.__main__ import build_parser, stage_eval_inputs

    config = tmp_path / "eval.yaml"
    config.write_text("model: {path: gs://b/models/tiny}\ndata: {val: {v: gs://b/data/val.jsonl}}\n")
    args = build_parser().parse_args(["eval", "--config", str(config), "--data", "t=gs://b/data/train.jsonl",
                                      "--data", "s=synthetic:arithmetic", "eval.n_samples=2"])
    stage_eval_inputs(args)
    cache = tmp_path / "cache" / "gcs" / "b"
    assert args.data == [f"t={cache / 'data' / 'train.jsonl'}", "s=synthetic:arithmetic"]
    assert args.overrides == ["eval.n_samples=2", f"model.path={cache / 'models' / 'tiny'}",
                              f"data.val.v={cache / 'data' / 'val.jsonl'}"]
    assert len(copies(bucket)) == 3
