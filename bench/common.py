"""Shared benchmark helpers: the machine's measured matmul peak, peak memory, FLOP counts, the
tiny random model both benches use, and JSON output.

Every bench measures its baseline (transformers, or the matmul peak) in the same process and
run as the thing it measures, because the CPUs these run on are shared and their speed drifts.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

OUT_DIR = Path(__file__).resolve().parent / "out"
# A Llama-style model small enough that the per-step overheads (dispatch, cache copies, sampling)
# dominate; a 512-token vocabulary keeps the logits cheap.
TINY_HF_CONFIG = dict(
    vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    tie_word_embeddings=True, rms_norm_eps=1e-5,
)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) with every output array finished."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    return result, time.perf_counter() - start


def matmul_peak_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """The best FLOP/s of a jitted [size, size] x [size, size] jnp.dot on this machine, now.

    The fraction of this peak that a workload reaches is the CPU's honest "MFU": the chip's
    datasheet peak is out of reach on shared, virtualised cores.
    """
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((size, size)), dtype)
    b = jnp.asarray(rng.standard_normal((size, size)), dtype)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    timed(lambda: dot(a, b))  # compile
    best = min(timed(lambda: dot(a, b))[1] for _ in range(repeats))
    return 2.0 * size**3 / best


def peak_rss_bytes() -> int:
    """The process's high-water resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """The peak resident memory during a `with` block, sampled every few milliseconds.

    The process-wide high-water mark only grows, so it cannot tell which of several measured
    phases used the memory; this can (it may miss a spike shorter than the interval).
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self.peak = current_rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def matmul_params(config) -> int:
    """Weights that take part in a matmul per token (a DecoderConfig): every layer's projections
    and the LM head; the embedding lookup is a gather, so it counts only when tied (as the head)."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f
    return config.num_layers * per_layer + d * config.vocab_size


def count_params(model) -> int:
    """All parameters of an NNX model, the usual "135M" count."""
    from flax import nnx

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def attention_flops_per_token(config, context: float) -> float:
    """Scores and weighted values: 2 matmuls x 2 FLOPs x heads x head_dim x attended positions."""
    return 4.0 * config.num_layers * config.num_heads * config.head_dim * context


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import flax
    import torch
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "flax": flax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
    }


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def make_tiny_hf_folder(folder: str | Path, seed: int = 0) -> Path:
    """A random tiny Llama saved as an HF folder, so both sides load identical weights."""
    import torch
    import transformers

    folder = Path(folder)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_HF_CONFIG)).eval()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    return folder
