"""The Encoder contract shared by every model family.

An encoder owns its preprocessing (read from the model's own config), turns a batch of
preprocessed tensors into L2-normalised float32 vectors, and describes itself with a stable
identity that manifests record and loaders compare.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import EncoderError

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from PIL import Image

log = logging.getLogger(__name__)

#: Bumped when a change in this package alters the vectors an encoder produces.
ENCODER_IMPL_VERSION = 1
#: Numeric precisions an encoder can run at (bf16 and fp16 by autocast).
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class Preprocess:
    """What an encoder does to an RGB image before the network sees it."""

    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    transform: Callable[[Image.Image], torch.Tensor] = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        self._split = _split_transform(self.transform)

    @property
    def worker_transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """The part that runs in decode workers: PIL geometry → uint8 CHW tensor when the
        transform is the usual resize/crop/to-tensor/normalise chain (4× less data to ship
        between processes, and the float maths runs batched); else the whole transform."""
        return self._split[0] if self._split else self.transform

    @property
    def worker_bytes(self) -> int:
        """Size of one image as :attr:`worker_transform` returns it (uint8 or float32)."""
        return 3 * self.crop * self.crop * (1 if self._split else 4)

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """Complete :attr:`worker_transform` on a stacked batch (bit-identical result)."""
        if self._split is None:
            return batch
        _, mean, std = self._split
        x = batch.float().div_(255)
        if mean is not None:
            x.sub_(mean.to(x.device)).div_(std.to(x.device))
        return x

    def describe(self) -> dict[str, Any]:
        return {
            "resize_shorter_side": self.resize,
            "center_crop": self.crop,
            "interpolation": self.interpolation,
            "mean": [round(float(m), 6) for m in self.mean],
            "std": [round(float(s), 6) for s in self.std],
        }


def preprocess_from_transform(transform: Any) -> Preprocess:
    """Read resize/crop/normalisation facts back from a torchvision ``Compose``.

    timm, open_clip and torchvision all build their eval transforms from the model's
    config; reading the result back records exactly what runs, not what we assume.
    """
    from torchvision import transforms as T

    resize = crop = 0
    interpolation = "bilinear"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    steps = getattr(transform, "transforms", [transform])
    for step in steps:
        if isinstance(step, T.Resize):
            size = step.size
            resize = int(size if isinstance(size, int) else min(size))
            interpolation = str(step.interpolation.value)
        elif isinstance(step, T.CenterCrop):
            crop = int(step.size[0])
        elif isinstance(step, T.Normalize):
            mean, std = tuple(step.mean), tuple(step.std)
        elif hasattr(step, "resize_size") and hasattr(step, "crop_size"):
            # torchvision's ImageClassification preset used by weights.transforms().
            resize = int(step.resize_size[0])
            crop = int(step.crop_size[0])
            interpolation = str(step.interpolation.value)
            mean, std = tuple(step.mean), tuple(step.std)
    if not resize:
        # e.g. open_clip's ResizeKeepRatio / "squash" transforms: fall back to the crop size.
        resize = crop or 224
    return Preprocess(resize, crop or resize, interpolation, mean, std, transform)


@contextlib.contextmanager
def _ieee_fp32_convolutions(enabled: bool) -> Iterator[None]:
    """fp32 on a GPU means fp32: cuDNN convolutions default to TF32 (10-bit mantissa), which
    moves the vectors further from the CPU's than fp32 rounding does. Restored afterwards."""
    if not enabled:
        yield
        return
    import torch

    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


class _PilToUint8:
    """Picklable PIL steps followed by ``pil_to_tensor`` (uint8 CHW)."""

    def __init__(self, steps: list[Callable[[Any], Any]]) -> None:
        self.steps = steps

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        for step in self.steps:
            image = step(image)
        return pil_to_tensor(image.convert("RGB") if image.mode != "RGB" else image)


def _split_transform(transform: Any) -> tuple[_PilToUint8, Any, Any] | None:
    """Split a recognised eval transform into (PIL part, mean, std), else None."""
    import torch
    from torchvision import transforms as T
    from torchvision.transforms import functional as F

    if hasattr(transform, "resize_size") and hasattr(transform, "crop_size"):
        # torchvision's ImageClassification preset (weights.transforms()).
        t = transform

        def resize(im: Any) -> Any:
            return F.resize(im, t.resize_size, interpolation=t.interpolation,
                            antialias=t.antialias)

        def crop(im: Any) -> Any:
            return F.center_crop(im, t.crop_size)

        mean = torch.as_tensor(t.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(t.std, dtype=torch.float32).view(-1, 1, 1)
        return _PilToUint8([resize, crop]), mean, std
    steps = list(getattr(transform, "transforms", []))
    pil_steps: list[Any] = []
    mean = std = None
    to_tensor_seen = False
    for step in steps:
        kind = type(step).__name__
        if not to_tensor_seen and isinstance(step, T.Resize | T.CenterCrop):
            pil_steps.append(step)
        elif not to_tensor_seen and kind == "MaybeConvertMode":
            continue  # open_clip: converts non-RGB modes; images here are RGB already
        elif kind in ("ToTensor", "MaybeToTensor"):
            to_tensor_seen = True
        elif to_tensor_seen and isinstance(step, T.Normalize) and mean is None:
            mean = torch.as_tensor(step.mean, dtype=torch.float32).view(-1, 1, 1)
            std = torch.as_tensor(step.std, dtype=torch.float32).view(-1, 1, 1)
        else:
            return None
    if not to_tensor_seen:
        return None
    return _PilToUint8(pil_steps), mean, std


@dataclass
class WeightsInfo:
    """Where an encoder's weights came from."""

    source: str  # "package:<name>", "file", "hub:<id>", "none"
    path: str | None = None
    sha256: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "sha256": self.sha256}


class Encoder:
    """A frozen image encoder. Subclasses set ``model``, ``preprocess`` and ``weights``."""

    #: True for encoders that can embed text into the image space (CLIP).
    supports_text = False
    #: True where exporting to another runtime cannot pay off (``--backend auto`` skips it).
    prefers_torch = False

    def __init__(self, spec: str, model: torch.nn.Module, preprocess: Preprocess,
                 weights: WeightsInfo) -> None:
        import torch

        self.spec = spec
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.preprocess = preprocess
        self.weights = weights
        self.precision = "fp32"
        self.channels_last = False
        self.device = "cpu"
        #: The configuration the model and preprocessing were resolved from (pretrained tag,
        #: activation, resize mode, …), recorded in the identity; None for fixed encoders.
        self.config: dict[str, Any] | None = None
        #: Set by :func:`embedsearch.encoders.backends.use_backend`: batch → features.
        self.runtime: Callable[[np.ndarray], np.ndarray] | None = None
        self.backend = "torch"
        #: torch on CPU runs each batch as single-threaded streams, one per core
        #: (:meth:`_forward_streams`); False: one call at torch's own thread count.
        self.cpu_streams = True
        self._pool: ThreadPoolExecutor | None = None
        with torch.inference_mode():
            probe = torch.zeros(1, 3, preprocess.crop, preprocess.crop)
            self.dim = int(self._forward(probe).shape[-1])
        self._fingerprint: np.ndarray | None = None

    # -- subclasses may override ---------------------------------------------------------
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Unnormalised features for a preprocessed batch."""
        return self.model(batch)

    def configure(self, precision: str = "fp32", channels_last: bool = False,
                  device: str = "cpu") -> None:
        """Choose the numeric precision ("fp32", or "bf16"/"fp16" autocast), memory layout
        and device ("auto", "cpu", "cuda", "cuda:N", "mps").

        bf16 and fp16 change the vectors slightly, so the precision is part of the identity;
        channels-last and the device only change the order of float operations and are not.
        """
        import torch

        from embedsearch.encoders.devices import resolve_device

        if precision not in PRECISIONS:
            raise EncoderError(f"unknown precision {precision!r}", hint=f"use one of {PRECISIONS}")
        self.precision = precision
        self.channels_last = channels_last
        self.device = resolve_device(device)
        self.runtime, self.backend = None, "torch"  # an exported graph is of the old settings
        self.model = self.model.to(
            device=self.device,
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        self._fingerprint = None

    # -- public API ----------------------------------------------------------------------
    def transform(self, image: Image.Image) -> torch.Tensor:
        """Preprocess one RGB image into a CHW float tensor."""
        return self.preprocess.transform(image)

    def encode_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Embed a preprocessed batch: float32, L2-normalised, finite (else EncoderError)."""
        import torch

        if self.runtime is not None:  # an exported graph (OpenVINO / ONNX Runtime), on CPU
            feats = torch.from_numpy(self.runtime(batch.cpu().contiguous().numpy()))
        else:
            batch = batch.to(self.device, non_blocking=True)
            if self.channels_last and batch.dim() == 4:
                batch = batch.contiguous(memory_format=torch.channels_last)
            streams = self._streams(len(batch))
            if streams > 1:
                feats = self._forward_streams(batch, streams)
            else:
                with self._run_context():
                    feats = self._forward(batch).float()
        feats = torch.nn.functional.normalize(feats, dim=-1)
        out = feats.cpu().numpy().astype(np.float32, copy=False)
        if not np.isfinite(out).all():
            raise EncoderError(
                f"encoder {self.spec} produced NaN or infinite values",
                hint="the weights file may be corrupt; rebuild with known-good weights",
            )
        return out

    def _run_context(self) -> contextlib.ExitStack:
        """inference mode, autocast at the precision, and IEEE fp32 convolutions on a GPU:
        all thread-local, so entered in each thread that runs the model."""
        import torch

        from embedsearch.encoders.devices import device_type

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(_ieee_fp32_convolutions(
            self.device.startswith("cuda") and self.precision == "fp32"))
        stack.enter_context(torch.autocast(
            device_type(self.device), enabled=self.precision != "fp32",
            dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16))
        return stack

    def _streams(self, images: int) -> int:
        """How many streams run a batch of ``images``: on CPU the cores torch would use
        (its thread count, capped by the cores this process may run on); else 1."""
        if not self.cpu_streams or self.device != "cpu" or images < 2:
            return 1
        import torch

        from embedsearch.encoders.devices import cpu_count

        return min(torch.get_num_threads(), cpu_count(), images)

    def _forward_streams(self, batch: torch.Tensor, streams: int) -> torch.Tensor:
        """The batch split into ``streams`` parts run at once by a thread pool, each part
        on one torch thread (torch releases the GIL); features in batch order.

        Why: torch's OpenMP threads meet at a barrier after every layer and spin while they
        wait, so beside one busy process on 2 cores the thread that shares its core stalls
        the other at every layer (intra-op threads kept about half their idle speed).
        Independent single-threaded streams have no barrier: the one that shares a core
        slows alone, as OpenVINO's streams do (benchmarks/results/thread_policy.md). The
        thread count is set in the worker before each part: torch's lazy per-thread
        initialisation would reset a count set once in the pool's initializer. The vectors
        are those of one call (max abs difference 0.0 on efficientnet-lite0).
        """
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from embedsearch.encoders.devices import cpu_count

        if self._pool is None:  # one worker per core: never more streams than that
            self._pool = ThreadPoolExecutor(cpu_count(), thread_name_prefix="embedsearch-stream")

        def run(part: torch.Tensor) -> torch.Tensor:
            torch.set_num_threads(1)
            with self._run_context():
                return self._forward(part).float()

        # torch.set_num_threads also sets process-wide defaults (MKL's count, the count new
        # threads start with): the caller's are restored after the batch.
        threads = torch.get_num_threads()
        try:
            futures = [self._pool.submit(run, part)
                       for part in torch.tensor_split(batch, streams)]
            return torch.cat([f.result() for f in futures])
        finally:
            torch.set_num_threads(threads)

    def __getstate__(self) -> dict[str, Any]:
        """Copies (``copy.deepcopy`` in fine-tuning) start their own thread pool."""
        return {**self.__dict__, "_pool": None}

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """Embed already-decoded RGB images."""
        import torch

        n = batch_size
        chunks = [
            self.encode_tensors(torch.stack([self.transform(im) for im in images[i:i + n]]))
            for i in range(0, len(images), n)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    def fingerprint(self) -> np.ndarray:
        """The embedding of a fixed synthetic image: equal vectors mean the same encoder."""
        if self._fingerprint is None:
            self._fingerprint = self.encode_images([fingerprint_image()])[0]
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        """Everything that determines the vectors: compared when loading bundles and heads."""
        ident = {
            "spec": self.spec,
            "dim": self.dim,
            "weights": self.weights.describe(),
            "preprocess": self.preprocess.describe(),
            "normalisation": "l2",
            "dtype": "float32",
            "precision": self.precision,
            "impl_version": ENCODER_IMPL_VERSION,
            "supports_text": self.supports_text,
        }
        if self.config is not None:
            ident["config"] = self.config
        return ident

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        raise EncoderError(
            f"encoder {self.spec} has no text tower, so zero-shot classification is not possible",
            hint="use a CLIP encoder, e.g. --model openclip:ViT-B-32@laion2b_s34b_b79k",
        )


def fingerprint_image() -> Image.Image:
    """A deterministic 256×256 test card: gradients, a disc and stripes (no RNG involved)."""
    from PIL import Image

    y, x = np.mgrid[0:256, 0:256].astype(np.float32)
    r = x
    g = y
    b = 255.0 * ((np.hypot(x - 128, y - 128) < 60) | ((x // 16) % 2 == 0) & (y > 200))
    arr = np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_state_dict(path: Path) -> dict[str, Any]:
    """Load a weights file without ever unpickling code.

    ``.safetensors`` is read with safetensors; anything else with
    ``torch.load(weights_only=True)``, which refuses pickled objects. There is no fallback.
    """
    import torch

    if not path.is_file():
        raise EncoderError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise EncoderError(f"{path}: not a valid safetensors file ({exc})") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderError(
            f"{path}: refused to load: it is not a plain tensor checkpoint "
            f"({type(exc).__name__}); pickled code is never executed",
            hint="convert the checkpoint to .safetensors, or pass a state dict saved with "
            "torch.save(model.state_dict(), path)",
        ) from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise EncoderError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def check_missing_keys(spec: str, path: Path, result: Any, allowed_missing: Callable[[str], bool]
                       ) -> None:
    """Raise when ``load_state_dict(strict=False)`` left real parameters unset."""
    missing = [k for k in result.missing_keys if not allowed_missing(k)]
    if missing or result.unexpected_keys:
        raise EncoderError(
            f"{path} does not fit {spec}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {list(result.unexpected_keys)[:3]})",
            hint="the weights file must be a state dict for exactly this architecture",
        )
