"""Decode images in parallel, then run the encoder on the batch.

Decoding (read, hash, safe decode with JPEG draft, geometric preprocessing to uint8) runs
in threads on CPU: Pillow's decoders and resamplers and hashlib release the GIL, so a batch
decodes on every core. With a GPU, it runs in processes ahead of the device. The float
normalisation runs batched in :meth:`Preprocess.finish` (on the GPU when there is one).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.data.images import DEFAULT_MAX_PIXELS, LoadFailure, load_image
from embedsearch.errors import EmbedsearchError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from embedsearch.encoders.base import Encoder

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]
#: An image transform applied after decoding, before the encoder's own preprocessing; it
#: gets the file's sha256 so random augmentations can be seeded per image (see views.py).
Augment = Callable[["Image.Image", str], "Image.Image"]


@dataclass
class ItemInfo:
    """What decoding learned about one file (``status`` is "ok" or a reason code)."""

    status: str
    detail: str = ""
    sha256: str | None = None
    size: int | None = None
    width: int = 0
    height: int = 0
    #: Pixel statistics (``embedsearch.audit.pixels``) when the caller asked for them.
    stats: dict[str, float] | None = None


class _Decoder:
    """Callable: source → (tensor or None, ItemInfo). Never raises for a bad image."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], target_size: int,
                 max_pixels: int, augment: Augment | None = None,
                 stats: bool = False) -> None:
        self.transform = transform
        self.target_size = target_size
        self.max_pixels = max_pixels
        self.augment = augment
        self.stats = stats

    def __call__(self, source: Path | bytes) -> tuple[torch.Tensor | None, ItemInfo]:
        loaded = load_image(source, target_size=self.target_size, max_pixels=self.max_pixels)
        if isinstance(loaded, LoadFailure):
            return None, ItemInfo(loaded.reason, loaded.detail, loaded.sha256, loaded.size)
        try:
            image = loaded.image
            if self.augment is not None:
                image = self.augment(image, loaded.sha256)
            tensor = self.transform(image)
        except Exception as exc:  # a transform failing on one odd image must not stop a run
            return None, ItemInfo("decode_error", f"preprocessing failed: {exc}",
                                  loaded.sha256, loaded.size)
        stats = None
        if self.stats:  # ~1 ms on a small copy, while the decoded image is at hand
            from embedsearch.audit.pixels import pixel_stats

            stats = pixel_stats(loaded.image)
        return tensor, ItemInfo("ok", "", loaded.sha256, loaded.size, loaded.width,
                                loaded.height, stats)


def _stack(tensors: list[Any]) -> Any:
    """One batch: numpy for the light encoder (no torch import), else a torch tensor."""
    if isinstance(tensors[0], np.ndarray):
        return np.stack(tensors)
    import torch

    return torch.stack(tensors)


def default_workers() -> int:
    """Decoding threads: one per core (Pillow and hashlib release the GIL)."""
    return max(1, os.cpu_count() or 1)


class _DecodeDataset:
    """Map-style dataset for torch's DataLoader: item i → _Decoder(sources[i])."""

    def __init__(self, decode: _Decoder, sources: Sequence[Path | bytes]) -> None:
        self.decode = decode
        self.sources = sources

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, ItemInfo]:
        return self.decode(self.sources[i])


def _collate(items: list[tuple[torch.Tensor | None, ItemInfo]]
             ) -> tuple[torch.Tensor | None, list[ItemInfo]]:
    """Stack a batch in the worker: one (uint8) tensor to pin and copy, not one per image."""
    tensors = [t for t, _ in items if t is not None]
    return (_stack(tensors) if tensors else None), [info for _, info in items]


def _thread_batches(decode: _Decoder, sources: Sequence[Path | bytes], batch_size: int,
                    workers: int) -> Iterator[tuple[torch.Tensor | None, list[ItemInfo]]]:
    """CPU: each batch decoded by a thread pool, then encoded, in turn (see below)."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers > 0 else None
    try:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            yield _collate(list(pool.map(decode, chunk)) if pool else [decode(s) for s in chunk])
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


PREFETCH_BATCHES = 2  # per decode process


def fit_shared_memory(workers: int, batch_bytes: int, shm: str = "/dev/shm") -> int:
    """Decode processes whose batches in flight fit in shared memory.

    DataLoader workers hand batches over through ``/dev/shm``; containers often give it
    64 MB (Docker's default), where 15 workers × 2 batches × 38 MB would end in a bus error.
    Fewer workers (0: decode in this process) and a warning instead.
    """
    try:
        free = shutil.disk_usage(shm).free
    except OSError:  # no /dev/shm (macOS): torch uses another mechanism
        return workers
    fit = max(0, int((0.8 * free / max(1, batch_bytes) - 2) // PREFETCH_BATCHES))
    if fit < workers:
        log.warning("%s has %d MB free: %d decode processes instead of %d (give the "
                    "container more shared memory, e.g. docker run --shm-size=4g)",
                    shm, free >> 20, fit, workers)
        return fit
    return workers


def _process_batches(decode: _Decoder, sources: Sequence[Path | bytes], batch_size: int,
                     workers: int, pin_memory: bool
                     ) -> Iterator[tuple[torch.Tensor | None, list[ItemInfo]]]:
    """Accelerator: torch's DataLoader decodes in ``workers`` processes, several batches
    ahead, into pinned memory, while the device encodes the current batch."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_DecodeDataset(decode, sources), batch_size=batch_size,
                        shuffle=False, num_workers=workers, collate_fn=_collate,
                        pin_memory=pin_memory,
                        prefetch_factor=PREFETCH_BATCHES if workers > 0 else None,
                        persistent_workers=False)
    yield from loader


def embed_sources(
    encoder: Encoder,
    sources: Sequence[Path | bytes],
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressFn | None = None,
    augment: Augment | None = None,
    pixel_stats: bool = False,
) -> Iterator[tuple[list[int], np.ndarray, list[ItemInfo]]]:
    """Yield (indices, vectors of the decoded ones, infos of all) per batch, in order.

    ``vectors[j]`` belongs to the j-th index whose info has status "ok". ``batch_size``
    defaults to the encoder's device's (32 on CPU, 256 on CUDA).

    On CPU each batch is decoded by ``num_workers`` threads (0: in this thread), then
    encoded. Decoding and the model take turns on all cores instead of running side by
    side: on a small machine a decode process preempting one of the model's threads stalls
    the others at the next barrier (measured: 56 vs 60 images/s fp32, 100 vs 129 bf16 on 2
    cores; see benchmarks/results/throughput.md). On a GPU the model leaves the CPUs idle,
    so ``num_workers`` processes (default: all CPUs but one) decode ahead into pinned
    memory while the GPU encodes; the uint8 batch is normalised on the GPU. ``augment``
    transforms each decoded image first.
    ``pixel_stats`` also fills ``ItemInfo.stats`` (from the image as decoded).
    """
    from embedsearch.encoders.devices import (
        default_batch_size,
        default_decode_processes,
        device_type,
    )

    prep = encoder.preprocess
    decode = _Decoder(prep.worker_transform, prep.resize, max_pixels, augment, pixel_stats)
    device = getattr(encoder, "device", "cpu")  # light (exported, numpy) encoders: CPU
    size = batch_size or default_batch_size(device)
    if (batch_size is not None and batch_size < 1) or (num_workers is not None
                                                       and num_workers < 0):
        raise EmbedsearchError(f"batch_size must be at least 1 and num_workers at least 0, "
                               f"got {batch_size} and {num_workers}")
    kind = device_type(device)
    if kind == "cpu":
        workers = default_workers() if num_workers is None else num_workers
        batches = _thread_batches(decode, sources, size, workers)
    else:
        workers = fit_shared_memory(
            default_decode_processes() if num_workers is None else num_workers,
            size * prep.worker_bytes)
        batches = _process_batches(decode, sources, size, workers, pin_memory=kind == "cuda")
    start = 0
    for stacked, infos in batches:
        if stacked is not None:
            if kind != "cpu":
                stacked = stacked.to(device, non_blocking=True)
            vectors = encoder.encode_tensors(prep.finish(stacked))
        else:
            vectors = np.zeros((0, encoder.dim), np.float32)
        if progress is not None:
            progress(len(infos))
        yield list(range(start, start + len(infos))), vectors, infos
        start += len(infos)
