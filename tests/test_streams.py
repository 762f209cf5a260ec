"""torch on CPU runs a batch as single-threaded streams, one per core (Encoder.cpu_streams)."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

from embedsearch.encoders import load_encoder
from embedsearch.encoders.base import Encoder


def _spy(enc: Encoder, fail_on: int | None = None) -> list[dict]:
    """Wrap ``enc._forward`` to record, per call, its thread, torch's thread count there,
    inference mode, autocast, and the batch size; ``fail_on``: raise on that call."""
    calls: list[dict] = []
    forward = enc._forward
    lock = threading.Lock()

    def spied(batch: torch.Tensor) -> torch.Tensor:
        with lock:
            calls.append({"thread": threading.current_thread().name,
                          "threads": torch.get_num_threads(), "size": len(batch),
                          "inference": torch.is_inference_mode_enabled(),
                          "autocast": torch.is_autocast_enabled("cpu")})
        if fail_on is not None and batch[0, 0, 0, 0].item() == fail_on:
            raise RuntimeError("stream failed")
        return forward(batch)

    enc._forward = spied
    return calls


def _distinct_batch(n: int) -> torch.Tensor:
    """n different images; image i has value i at pixel (0, 0, 0) to identify it."""
    batch = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    return batch


def test_streams_give_one_calls_vectors_in_batch_order_on_single_threaded_workers() -> None:
    enc = load_encoder("test:tiny")
    batch = _distinct_batch(11)
    enc.cpu_streams = False
    one_call = enc.encode_tensors(batch)
    enc.cpu_streams = True
    calls = _spy(enc)
    main_threads = torch.get_num_threads()
    with torch.inference_mode():
        feats = enc._forward_streams(batch, 3).numpy()
    assert sorted(c["size"] for c in calls) == [3, 4, 4]  # torch.tensor_split's parts
    assert all(c["thread"].startswith("embedsearch-stream") for c in calls)
    assert all(c["threads"] == 1 and c["inference"] for c in calls)
    assert torch.get_num_threads() == main_threads  # the caller's count is untouched
    normalised = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    assert np.abs(normalised - one_call).max() <= 1e-6  # same vectors, same order
    # each row is its own image's vector, not a neighbour's
    singles = np.concatenate([enc.encode_tensors(batch[i:i + 1]) for i in range(11)])
    assert np.abs(singles - one_call).max() <= 1e-6


def test_workers_enter_autocast_at_the_encoders_precision() -> None:
    enc = load_encoder("test:tiny")
    enc.configure(precision="bf16")
    calls = _spy(enc)
    enc._forward_streams(_distinct_batch(4), 2)
    assert len(calls) == 2 and all(c["autocast"] and c["inference"] for c in calls)


def test_a_failing_stream_raises_its_error() -> None:
    enc = load_encoder("test:tiny")
    _spy(enc, fail_on=4)  # image 4 is in the second of two parts of 8
    with pytest.raises(RuntimeError, match="stream failed"):
        enc._forward_streams(_distinct_batch(8), 2)


def test_stream_count_follows_torch_threads_and_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    enc = load_encoder("test:tiny")
    monkeypatch.setattr("embedsearch.encoders.devices.cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert enc._streams(32) == 2  # capped by the cores this process may use
    assert enc._streams(1) == 1  # one image: one call
    monkeypatch.setattr("embedsearch.encoders.devices.cpu_count", lambda: 8)
    assert enc._streams(32) == 4  # capped by torch's thread count
    assert enc._streams(3) == 3
    monkeypatch.setattr("embedsearch.encoders.devices.cpu_count", lambda: 1)
    assert enc._streams(32) == 1  # a single core: one call, as before
    monkeypatch.setattr("embedsearch.encoders.devices.cpu_count", lambda: 2)
    enc.cpu_streams = False
    assert enc._streams(32) == 1
    enc.cpu_streams, enc.device = True, "cuda"
    assert enc._streams(32) == 1  # a GPU runs the batch in one call


def test_encode_tensors_uses_streams_and_copies_start_their_own_pool(
        monkeypatch: pytest.MonkeyPatch) -> None:
    enc = load_encoder("test:tiny")
    monkeypatch.setattr(enc, "_streams", lambda images: 2)
    calls = _spy(enc)
    batch = _distinct_batch(6)
    first = enc.encode_tensors(batch)
    assert [c["size"] for c in calls] == [3, 3] and enc._pool is not None
    twin = copy.deepcopy(enc)  # fine-tuning copies encoders; a pool cannot be copied
    assert twin._pool is None
    np.testing.assert_array_equal(twin.encode_tensors(batch), first)
