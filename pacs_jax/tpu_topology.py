"""Cloud TPU slices as libtpu describes them, for compiling on a CPU: product names ("v5p-64",
"v5e-4") -> chip grids and hosts, libtpu's version check, and the devices of a topology
description (no chip needed). Used by `python -m pacs_jax compile` (compile_tpu.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import tempfile
from typing import Optional

from pacs_jax.config import ConfigError

GIB = 1024**3

# Usable HBM per chip (GiB) as Cloud TPU documents it; the compiler's own limit is what decides.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}

# Slice shapes Cloud TPU offers. v4 and v5p product names count TensorCores (2 per chip, run as
# one "megacore" device), v5e and v6e names count chips.
_CUBE_SHAPES = {  # TensorCores -> chips x, y, z
    8: (2, 2, 1), 16: (2, 2, 2), 32: (2, 2, 4), 64: (2, 4, 4), 128: (4, 4, 4), 256: (4, 4, 8),
    512: (4, 8, 8), 1024: (8, 8, 8), 2048: (8, 8, 16), 4096: (8, 16, 16), 8192: (16, 16, 16),
}
_GRID_SHAPES = {  # chips -> chips x, y
    1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16),
}
# product-name prefix -> generation
_GENERATIONS = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}


@dataclasses.dataclass(frozen=True)
class TpuTopology:
    """One TPU slice as libtpu's topology description needs it."""

    name: str  # as the user wrote it, e.g. "v5p-64"
    generation: str  # v4 | v5p | v5e | v6e
    shape: tuple[int, ...]  # chips along each axis
    chips_per_host: tuple[int, int, int]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def hosts(self) -> int:
        return self.chips // math.prod(self.chips_per_host)

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def chip_config(self) -> str:
        # v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore").
        return "megacore" if self.generation in ("v4", "v5p") else "default"

    @property
    def hbm_bytes(self) -> int:
        return HBM_GIB[self.generation] * GIB


def known_topologies() -> list[str]:
    """Every product name `parse_topology` accepts (explicit forms like "v5e:2x2" also work)."""
    names = [f"{g}-{cores}" for g in ("v4", "v5p") for cores in _CUBE_SHAPES if not (g == "v4" and cores > 4096)]
    names += [f"{g}-{chips}" for g in ("v5e", "v5litepod", "v6e") for chips in _GRID_SHAPES]
    return names


def _chips_per_host(generation: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    chips = math.prod(shape)
    if generation in ("v5e", "v6e") and chips <= 8:
        return (*shape, 1) if len(shape) == 2 else shape  # one host holds the whole slice (1, 4 or 8 chips)
    return (2, 2, 1)  # multi-host slices: 4 chips per host on every generation


def parse_topology(name: str) -> TpuTopology:
    """"v5p-64", "v4-8", "v5e-16" / "v5litepod-16", "v6e-8", or libtpu's "v5e:2x2" / "v5p:2x4x4"."""
    text = name.strip().lower()
    explicit = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)", text)
    product = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", text)
    shape: Optional[tuple[int, ...]] = None
    generation = ""
    if explicit:
        generation = explicit.group(1)
        shape = tuple(int(n) for n in explicit.group(2).split("x"))
        allowed = _CUBE_SHAPES.values() if generation in ("v4", "v5p") else _GRID_SHAPES.values()
        if shape not in allowed:
            shape = None
    elif product:
        generation = _GENERATIONS[product.group(1)]
        count = int(product.group(2))
        shape = _CUBE_SHAPES.get(count) if generation in ("v4", "v5p") else _GRID_SHAPES.get(count)
    if shape is None:
        raise ConfigError(
            f"unknown TPU topology {name!r}. Known: {', '.join(known_topologies())}; or libtpu's form "
            f"GEN:SHAPE with a shape from those (e.g. v5e:2x2, v5p:2x4x4). v4/v5p names count "
            f"TensorCores (v5p-64 = 32 chips), v5e/v6e names count chips"
        )
    return TpuTopology(name, generation, shape, _chips_per_host(generation, shape))


def libtpu_problem() -> Optional[str]:
    """Why libtpu cannot compile here (not installed, or not the version this jax's [tpu] extra pins), or None."""
    import importlib.metadata as metadata

    fix = "pip install -e '.[tpu]' (jax's [tpu] extra installs the libtpu matching your jax)"
    if importlib.util.find_spec("libtpu") is None:
        return f"libtpu is not installed; {fix}"
    wanted = next((r for r in metadata.requires("jax") or [] if r.startswith("libtpu") and "tpu" in r.split(";", 1)[-1]), "")
    pin = re.match(r"libtpu\s*==\s*([\w.]+?)(\.\*)?\s*(;|$)", wanted)
    installed = metadata.version("libtpu")
    if pin and not (installed == pin.group(1) or (pin.group(2) and installed.startswith(pin.group(1) + "."))):
        return f"libtpu {installed} is installed but jax {metadata.version('jax')} needs {wanted.split(';')[0].strip()}; {fix}"
    return None


@contextlib.contextmanager
def _quiet_libtpu_probe():
    """Hold back what libtpu writes to stderr while it loads: off a TPU VM it always complains that
    it cannot find TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES, which compiling does not need (the
    topology is given). If loading fails, everything it wrote is passed on with the error."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            sys.stderr.flush()
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tpu_devices(topology: TpuTopology) -> list:
    """The devices of `topology` (for compiling only), from libtpu's topology description."""
    problem = libtpu_problem()
    if problem:
        raise ConfigError(f"compiling for TPU needs libtpu: {problem}")
    # libtpu takes a machine-wide lock meant for processes that drive chips; this one only compiles,
    # so it must not collide with (or block) other JAX processes on the same machine.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    with _quiet_libtpu_probe():
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology.libtpu_name,
            chip_config_name=topology.chip_config,
            chips_per_host_bounds=topology.chips_per_host,
            num_slices=1,
            # Wrap-around links change collective routing, not memory; no wrap is valid for every size.
            wrap=(False, False, False),
        )
    devices = list(description.devices)
    if len(devices) != topology.chips:
        raise RuntimeError(f"libtpu describes {topology.libtpu_name} with {len(devices)} devices, expected {topology.chips} chips")
    return devices
