"""Decode images in worker processes while the encoder runs in the main one.

Decoding (read, hash, safe decode with JPEG draft, preprocess) happens in a torch
DataLoader's workers; the main process only stacks tensors and runs the model, so on a
2-core machine the model, not decoding, sets the pace.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.data.images import DEFAULT_MAX_PIXELS, LoadFailure, load_image

if TYPE_CHECKING:
    import torch

    from embedsearch.encoders.base import Encoder

ProgressFn = Callable[[int], None]


@dataclass
class ItemInfo:
    """What decoding learned about one file (``status`` is "ok" or a reason code)."""

    status: str
    detail: str = ""
    sha256: str | None = None
    size: int | None = None
    width: int = 0
    height: int = 0


class _DecodeDataset:
    """Map-style dataset: index → (index, tensor or None, ItemInfo)."""

    def __init__(self, sources: Sequence[Path | bytes], transform: Callable[[Any], torch.Tensor],
                 target_size: int, max_pixels: int) -> None:
        self.sources = sources
        self.transform = transform
        self.target_size = target_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, ItemInfo]:
        loaded = load_image(self.sources[i], target_size=self.target_size,
                            max_pixels=self.max_pixels)
        if isinstance(loaded, LoadFailure):
            return i, None, ItemInfo(loaded.reason, loaded.detail, loaded.sha256, loaded.size)
        try:
            tensor = self.transform(loaded.image)
        except Exception as exc:  # a transform failing on one odd image must not stop a run
            return i, None, ItemInfo("decode_error", f"preprocessing failed: {exc}",
                                     loaded.sha256, loaded.size)
        return i, tensor, ItemInfo("ok", "", loaded.sha256, loaded.size, loaded.width,
                                   loaded.height)


def _keep_list(batch: list[Any]) -> list[Any]:
    return batch


def default_workers() -> int:
    """Decoding workers: one per spare core, at least one so decoding overlaps the model."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def embed_sources(
    encoder: Encoder,
    sources: Sequence[Path | bytes],
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: ProgressFn | None = None,
) -> Iterator[tuple[list[int], np.ndarray, list[ItemInfo]]]:
    """Yield (indices, vectors of the decoded ones, infos of all) per batch, in order.

    ``vectors[j]`` belongs to the j-th index whose info has status "ok".
    """
    import torch
    from torch.utils.data import DataLoader

    workers = default_workers() if num_workers is None else num_workers
    prep = encoder.preprocess
    dataset = _DecodeDataset(sources, prep.worker_transform, prep.resize, max_pixels)
    loader = DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers if len(sources) > batch_size else 0,
        collate_fn=_keep_list,
        prefetch_factor=4 if workers and len(sources) > batch_size else None,
    )
    for batch in loader:
        indices = [i for i, _, _ in batch]
        infos = [info for _, _, info in batch]
        tensors = [t for _, t, _ in batch if t is not None]
        if tensors:
            vectors = encoder.encode_tensors(prep.finish(torch.stack(tensors)))
        else:
            vectors = np.zeros((0, encoder.dim), np.float32)
        if progress is not None:
            progress(len(batch))
        yield indices, vectors, infos
