"""Decode images with a thread pool, then run the encoder on the batch.

Decoding (read, hash, safe decode with JPEG draft, geometric preprocessing to uint8) runs
in threads: Pillow's decoders and resamplers and hashlib release the GIL, so a batch
decodes on every core; the float normalisation runs batched in :meth:`Preprocess.finish`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.data.images import DEFAULT_MAX_PIXELS, LoadFailure, load_image

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from embedsearch.encoders.base import Encoder

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


class _Decoder:
    """Callable: source → (tensor or None, ItemInfo). Never raises for a bad image."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], target_size: int,
                 max_pixels: int, augment: Augment | None = None) -> None:
        self.transform = transform
        self.target_size = target_size
        self.max_pixels = max_pixels
        self.augment = augment

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
        return tensor, ItemInfo("ok", "", loaded.sha256, loaded.size, loaded.width,
                                loaded.height)


def default_workers() -> int:
    """Decoding threads: one per core (Pillow and hashlib release the GIL)."""
    return max(1, os.cpu_count() or 1)


def embed_sources(
    encoder: Encoder,
    sources: Sequence[Path | bytes],
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressFn | None = None,
    augment: Augment | None = None,
) -> Iterator[tuple[list[int], np.ndarray, list[ItemInfo]]]:
    """Yield (indices, vectors of the decoded ones, infos of all) per batch, in order.

    ``vectors[j]`` belongs to the j-th index whose info has status "ok". Each batch is
    decoded by ``num_workers`` threads (0: in this thread), then encoded. Decoding and the
    model take turns on all cores instead of running side by side: on a small machine a
    decode process preempting one of the model's threads stalls the others at the next
    barrier (measured: 56 vs 60 images/s fp32, 100 vs 129 bf16 on 2 cores; see
    benchmarks/results/throughput.md). ``augment`` transforms each decoded image first.
    """
    import torch

    workers = default_workers() if num_workers is None else num_workers
    prep = encoder.preprocess
    decode = _Decoder(prep.worker_transform, prep.resize, max_pixels, augment)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="decode") if workers > 0 else None
    try:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            decoded = list(pool.map(decode, chunk)) if pool else [decode(s) for s in chunk]
            infos = [info for _, info in decoded]
            tensors = [t for t, _ in decoded if t is not None]
            if tensors:
                vectors = encoder.encode_tensors(prep.finish(torch.stack(tensors)))
            else:
                vectors = np.zeros((0, encoder.dim), np.float32)
            if progress is not None:
                progress(len(chunk))
            yield list(range(start, start + len(chunk))), vectors, infos
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
