"""The test suite's encoder plugin: ``test:tiny``, registered like any third-party encoder.

tests/conftest.py puts this folder on ``sys.path`` and ``PYTHONPATH``, so the
``embedsearch_test_encoders-1.0.dist-info`` beside this file is an installed distribution
to ``importlib.metadata`` in the test process and in every process the tests start (CLI
subprocesses, servers, Ray workers). Its ``entry_points.txt`` registers the family
``test`` in the ``embedsearch.encoders`` group: each ``--model test:tiny`` in the suite
goes through the real plugin mechanism.

``EMBEDSEARCH_TEST_DELAY_S`` (read where the encoder is built) makes each batch sleep that
long: tests that must catch a job midway (a killed Ray driver) slow their workers with it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from embedsearch.encoders.base import Encoder, WeightsInfo, preprocess_from_transform
from embedsearch.errors import EncoderError

if TYPE_CHECKING:
    import torch

#: Seconds each batch sleeps (environment variable of the process building the encoder).
DELAY_ENV = "EMBEDSEARCH_TEST_DELAY_S"


class TinyEncoder(Encoder):
    """Hand-made colour-layout and edge features: deterministic, weightless, fast.

    Exists so the whole pipeline (registry, decoding, store, index) can be tested without
    pretrained weights. It separates colours and coarse shapes, nothing more.
    """

    prefers_torch = True
    delay = 0.0

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        if self.delay > 0:
            time.sleep(self.delay)
        x = batch - 0.5
        colour = F.adaptive_avg_pool2d(x, 4).flatten(1)
        grey = batch.mean(dim=1, keepdim=True)
        gx = (grey[..., :, 1:] - grey[..., :, :-1]).abs()
        gy = (grey[..., 1:, :] - grey[..., :-1, :]).abs()
        edges = F.adaptive_avg_pool2d(gx[..., :-1, :] + gy[..., :, :-1], 4).flatten(1)
        return torch.cat([colour, 4.0 * edges], dim=1)


def build_tiny(spec: str, name: str, weights: Path | None) -> TinyEncoder:
    """The ``embedsearch.encoders`` factory of the family ``test``: ``test:tiny`` is the 64-d
    test encoder (colour layout 48 + edges 16) on 32 × 32 pixels."""
    import torch
    from torchvision import transforms as T

    if name != "tiny":
        raise EncoderError(f"unknown test encoder {spec!r}", hint="the family has test:tiny")
    if weights is not None:
        raise EncoderError(f"{spec} has no weights; do not pass --weights")
    transform = T.Compose([
        T.Resize(32, interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(32),
        T.ToTensor(),
    ])
    encoder = TinyEncoder(spec, torch.nn.Identity(), preprocess_from_transform(transform),
                          WeightsInfo("none"))
    encoder.delay = float(os.environ.get(DELAY_ENV) or 0)
    return encoder
