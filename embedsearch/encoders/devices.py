"""Where an encoder runs: device names, their checks, and the per-device defaults.

The device is not part of an encoder's identity (a bundle built on a GPU is queried on a
CPU and the other way round); the precision is.
"""

from __future__ import annotations

import os
import re

from embedsearch.errors import EncoderError

#: What ``--device`` accepts.
DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
#: Images per batch: small on CPU (caches; the throughput benchmark), large on a GPU so the
#: kernels fill the device.
BATCH_SIZE = {"cpu": 32, "mps": 64, "cuda": 256}


def resolve_device(device: str | None = "auto") -> str:
    """``auto`` → ``cuda`` when a CUDA GPU is visible, else ``mps`` (Apple), else ``cpu``.

    An explicit device that is not there is an :class:`EncoderError` saying why (a CPU-only
    torch build, no GPU visible, an index past the GPU count) and what to do instead.
    """
    import torch

    name = (device or "auto").strip().lower()
    if not _DEVICE_RE.match(name):
        raise EncoderError(f"unknown device {device!r}", hint=f"use one of {DEVICE_CHOICES}")
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: "
                   "no NVIDIA driver or CUDA_VISIBLE_DEVICES hides it")
            raise EncoderError(f"--device {name}: CUDA is not available ({why})",
                               hint="use --device cpu (or auto); for a GPU install torch's "
                               "CUDA wheel and check `nvidia-smi`")
        index = int(name.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise EncoderError(f"--device {name}: there are {count} CUDA devices (0…{count - 1})",
                               hint="use --device cuda:0, or check CUDA_VISIBLE_DEVICES")
        return name
    if name == "mps" and not _mps_available():
        raise EncoderError("--device mps: Apple's Metal (MPS) backend is not available here",
                           hint="use --device cpu (or auto)")
    return name


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def device_type(device: str) -> str:
    """``cuda:1`` → ``cuda``: the kind, for autocast and per-device defaults."""
    return device.partition(":")[0]


def default_batch_size(device: str) -> int:
    return BATCH_SIZE.get(device_type(device), 32)


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def default_decode_processes() -> int:
    """Decoding processes feeding an accelerator: every CPU but the one driving the device.

    Threads cannot keep a GPU busy: JPEG decoding and resizing release the GIL, but the
    Python around them (and hashing small files) does not, so past a few threads they
    queue on the GIL.
    """
    return max(1, cpu_count() - 1)
