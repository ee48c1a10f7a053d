"""gs:// inputs on local disk: model folders and data files copied once per machine.

A TPU VM's disk goes with the VM (a spot VM is recreated on a fresh one), so the weights and
data of a Cloud TPU run live in a bucket: `model.path`, `model.tokenizer`, `data.train` and
`data.val` may be gs:// paths. `stage_inputs(config)` copies each one (with `gcloud storage cp`,
which every TPU VM image has) into the cache folder $PACS_JAX_CACHE/gcs/BUCKET/PATH (default
~/.cache/pacs_jax) and returns the config with the local paths. A finished copy is marked by
PATH.complete and never fetched again on that machine; an interrupted one is started over. The
processes of one machine take turns through a lock file, so they copy once between them.

A copy that fails for a passing reason (a 503 from the bucket, a dropped connection) is tried
again with backoff (`with_retries`; data.py does the same for Hugging Face dataset downloads);
one that outlasts its tries raises TransientIOError, which the CLI reports with exit status 75
(EX_TEMPFAIL), not 2: launch/spot_loop.sh starts such a run again, but stops on a config error.
A failure that no retry can fix (no such object, no permission) is a ConfigError at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import shutil
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, TypeVar

from pacs_jax.config import Config, ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Exit status of a run stopped by an I/O error that outlasted its retries (sysexits' EX_TEMPFAIL):
# "try again later", where 2 means "fix the config".
TRANSIENT_EXIT_STATUS = 75


class TransientIOError(OSError):
    """An I/O error that may pass (a 503, a dropped connection) and outlasted its retries."""


def retry_settings() -> tuple[int, float]:
    """(tries, first pause in seconds): $PACS_JAX_IO_TRIES (default 8) and
    $PACS_JAX_IO_RETRY_SECONDS (default 5; the pause doubles each time, up to 5 minutes: about
    10 minutes in all)."""
    return int(os.environ.get("PACS_JAX_IO_TRIES", "8")), float(os.environ.get("PACS_JAX_IO_RETRY_SECONDS", "5"))


def with_retries(attempt: Callable[[], T], what: str) -> T:
    """attempt() until it returns. It raises TransientIOError (with the reason) for a failure
    worth another try; anything else it raises goes straight to the caller. After the last try
    the TransientIOError goes to the caller too."""
    tries, pause = retry_settings()
    for number in range(1, max(tries, 1) + 1):
        try:
            return attempt()
        except TransientIOError as error:
            if number >= tries:
                raise TransientIOError(f"{what} failed {number} times; the last error: {error}") from error
            logger.warning("%s failed (%s); try %d of %d in %.0f s", what, error, number + 1, tries, pause)
            print(f"{what} failed ({str(error)[-300:]}); trying again in {pause:.0f} s", flush=True)
            time.sleep(pause)
            pause = min(2 * pause, 300.0)
    raise AssertionError("unreachable")


# gcloud storage failures no retry fixes: the object is not there, or this machine may not read it.
_PERMANENT_COPY_ERROR = re.compile(
    r"matched no objects|HTTPError 40[134]|\b40[134]\b.*(Forbidden|Not Found|Unauthorized)|NotFound|AccessDenied|"
    r"does not have storage\.|Permission .* denied|Invalid bucket name|InvalidArgument", re.IGNORECASE)


def cache_root() -> Path:
    return Path(os.environ.get("PACS_JAX_CACHE", "~/.cache/pacs_jax")).expanduser() / "gcs"


def local_copy(url: str, key: str) -> Path:
    """The local copy of gs://BUCKET/PATH (a file or a folder), fetched unless already cached.
    `key` is the config key that named it, for error messages."""
    if not url.startswith("gs://") or len(url.rstrip("/")) <= len("gs://"):
        raise ConfigError(f"{key}={url}: expected gs://BUCKET/PATH")
    relative = url[len("gs://"):].strip("/")
    dest = cache_root() / relative
    done = dest.with_name(dest.name + ".complete")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(dest.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other processes of this machine wait for this copy
        if done.is_file() and dest.exists():
            logger.info("%s: using the cached copy %s", url, dest)
            return dest
        gcloud = shutil.which("gcloud")
        if gcloud is None:
            raise ConfigError(
                f"{key}={url} needs the gcloud CLI to copy it to this machine (TPU VM images have it; "
                "elsewhere install the Google Cloud CLI), or give a local path"
            )
        partial = dest.with_name(dest.name + ".partial")
        logger.info("%s: copying to %s (once per machine)", url, dest)
        print(f"copying {url} to {dest} (once per machine) ...", flush=True)

        def copy() -> None:
            shutil.rmtree(partial, ignore_errors=True)  # what a failed try left
            partial.mkdir()
            copied = subprocess.run([gcloud, "storage", "cp", "-r", url.rstrip("/"), str(partial) + "/"],
                                    capture_output=True, text=True)
            if copied.returncode == 0:
                return
            error = copied.stderr.strip()[-2000:]
            if _PERMANENT_COPY_ERROR.search(error):
                raise ConfigError(
                    f"{key}={url}: copying it failed (gcloud storage cp exited {copied.returncode}): "
                    f"{error}\nCheck the path (gcloud storage ls {url}) and that this "
                    "machine's service account can read the bucket (roles/storage.objectViewer)"
                )
            # Anything else (a 503 or 429 from the bucket, a dropped connection) may pass.
            raise TransientIOError(f"gcloud storage cp exited {copied.returncode}: {error}")

        with_retries(copy, f"copying {key}={url}")
        [item] = list(partial.iterdir())
        if dest.is_dir():
            shutil.rmtree(dest)
        elif dest.exists():
            dest.unlink()
        item.rename(dest)
        partial.rmdir()
        done.write_text(url + "\n")
        return dest


def stage_inputs(config: Config) -> Config:
    """`config` with every gs:// model / tokenizer / data path replaced by its local copy.
    Validation sets are copied only when validation is on (trainer.eval_every or
    trainer.val_before_train)."""
    model, data, trainer = config.model, config.data, config.trainer
    changes_model = {name: str(local_copy(getattr(model, name), f"model.{name}"))
                     for name in ("path", "tokenizer") if getattr(model, name).startswith("gs://")}
    changes_data = {}
    if data.train.startswith("gs://"):
        changes_data["train"] = str(local_copy(data.train, "data.train"))
    validating = bool(trainer.eval_every) or bool(getattr(trainer, "val_before_train", False))
    if validating and any(str(src).startswith("gs://") for src in data.val.values()):
        changes_data["val"] = {name: str(local_copy(src, f"data.val.{name}")) if str(src).startswith("gs://") else src
                               for name, src in data.val.items()}
    if not changes_model and not changes_data:
        return config
    return dataclasses.replace(config, model=dataclasses.replace(model, **changes_model),
                               data=dataclasses.replace(data, **changes_data))
