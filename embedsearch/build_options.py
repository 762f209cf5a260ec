"""BuildOptions: how :func:`embedsearch.pipeline.build_index` reads, encodes and stores a
collection."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from embedsearch.encoders.base import Encoder
    from embedsearch.engines.ray_engine import RayOptions

DEFAULT_SHARD_SIZE = 512
#: ``progress(total, already_done)`` may return a callback that receives image counts as
#: encoding advances (the CLI passes a progress bar).
Progress = Callable[[int, int], Callable[[int], None]]


@dataclass(frozen=True)
class BuildOptions:
    """Everything a build can be told besides where the images and the bundle are.

    The defaults build (or refresh) a bundle with the default encoder, or with the encoder
    the existing bundle was built with. Settings that stick to a bundle (``dedupe``,
    ``views``) keep their previous value when left at None.
    """

    # -- the encoder ------------------------------------------------------------------------
    #: Encoder spec; several specs (``SPEC`` or ``SPEC=FILE``) make one bundle of their
    #: concatenated embeddings (:mod:`embedsearch.encoders.combine`). None: the existing
    #: bundle's encoder, else the default one.
    model: str | Sequence[str] | None = None
    #: Local weights file for ``model`` (a single encoder only).
    weights: str | os.PathLike[str] | None = None
    #: "fp32", "bf16"…; None: the bundle's previous precision, else the default.
    precision: str | None = None
    #: An already built encoder, used instead of ``model``/``weights``/``precision``.
    encoder: Encoder | None = None
    #: Where images are encoded ("auto", "cpu", "cuda[:N]", "mps"); not part of the
    #: bundle's identity (the precision is).
    device: str = "auto"
    # -- reading the collection --------------------------------------------------------------
    #: CSV/Parquet sources: the columns holding the image path, label and split.
    path_col: str | None = None
    label_col: str | None = None
    split_col: str | None = None
    follow_symlinks: bool = False
    #: CSV/Parquet sources: rows whose file is missing are recorded as failures, not fatal.
    skip_missing: bool = False
    #: Split folders or values not recognised from their words, e.g.
    #: "sample_train=train,holdout=test".
    split_map: str | dict[str, str] | None = None
    #: A reviewed list of ids to leave out (:mod:`embedsearch.audit.exclude`), recorded as
    #: skipped.
    exclude: str | os.PathLike[str] | None = None
    # -- the bundle --------------------------------------------------------------------------
    #: Start over: replace the bundle (and its cached shards) instead of refreshing it.
    overwrite: bool = False
    #: faiss index: "auto", "flat", "ivf", "ivfpq" or "hnsw" (:mod:`embedsearch.index`).
    index_type: str = "auto"
    #: True leaves near-duplicates out of the index (:mod:`embedsearch.dedupe`); the choice
    #: sticks to the bundle until False. None: the bundle's previous choice.
    dedupe: bool | None = None
    #: With ``dedupe``: the similarity threshold and keep policy (None: previous/default).
    dedupe_threshold: float | None = None
    dedupe_keep: str | None = None
    #: "flip,crop2": also embed augmented views of the training images for heads
    #: (:mod:`embedsearch.views`); sticks until "none". None: the previous setting.
    views: str | None = None
    # -- running -----------------------------------------------------------------------------
    #: Images per batch; None: the device's default (32 on CPU, 256 on CUDA).
    batch_size: int | None = None
    #: Decode workers; None: chosen from the CPU count.
    num_workers: int | None = None
    #: Images per committed cache shard (what a killed build resumes from).
    shard_size: int = DEFAULT_SHARD_SIZE
    #: "local" or "ray" (a Ray cluster: :mod:`embedsearch.engines.ray_engine`); the bundle
    #: is the same.
    engine: str = "local"
    ray_options: RayOptions | None = None
    progress: Progress | None = None
