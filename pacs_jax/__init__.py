"""pacs_jax: PACS post-training for LLMs in JAX / Flax NNX."""

import glob
import importlib.util
import os
import sys

__version__ = "0.1.0"

_GOOGLE_PCI_VENDOR = "0x1ae0"
_NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def _tpu_chips_attached() -> bool:
    """A Google TPU on the PCI bus (how JAX's own cloud_tpu_init tells a TPU VM), a TPU device file,
    or TPU settings in the environment."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or "TPU_ACCELERATOR_TYPE" in os.environ:
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def _gpu_attached() -> bool:
    return any(os.path.exists(d) for d in _NVIDIA_DEVICES) or os.path.isdir("/sys/class/kfd/kfd/topology/nodes")


def default_to_cpu_without_accelerator() -> bool:
    """On a machine with neither a TPU nor a GPU, make JAX use the CPU without probing for a TPU.

    With libtpu installed (the `tpu` and `test` extras) and JAX_PLATFORMS unset, JAX loads libtpu
    to look for TPU chips, and libtpu prints errors about TPU_ACCELERATOR_TYPE and
    TPU_WORKER_HOSTNAMES on any machine that is not a Cloud TPU VM. Where there is no accelerator
    to find, JAX_PLATFORMS=cpu is what JAX would pick anyway, minus the noise. A JAX_PLATFORMS
    (or JAX_FORCE_TPU_INIT) the user set, a TPU VM and a GPU machine are left as they are.
    `python -m pacs_jax compile` loads libtpu itself for the topology it compiles for.
    Returns whether it changed the platform.
    """
    if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
        return False
    if importlib.util.find_spec("libtpu") is None or _tpu_chips_attached() or _gpu_attached():
        return False
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax = sys.modules.get("jax")
    if jax is not None and hasattr(jax, "config"):  # imported before pacs_jax: JAX read its environment then
        jax.config.update("jax_platforms", "cpu")
    return True


default_to_cpu_without_accelerator()
