"""Encode on a Ray cluster: Ray Data streams the image list through a pool of encoder actors.

The driver (the process running ``build_index``) scans the collection, decides what still
needs encoding, and commits results shard by shard exactly as the local engine does; only
the decode + encode work moves to the cluster::

    ray.data.from_arrow(blocks of (pos, path))
        .map_batches(EncoderActor, concurrency=N, batch_size=B, num_cpus=C, num_gpus=G)
        .iter_batches()  →  reordered by pos  →  one chunk of shard_size at a time

Each actor loads the encoder once from its spec (and weights file), checks that its
identity and fingerprint match the driver's encoder (a worker with other library versions
or other weights would otherwise silently write different vectors into the same bundle),
then decodes with :func:`embedsearch.data.images.load_image` and encodes with
``encoder.encode_tensors``. A file that cannot be used comes back as a row with its reason
code, as on one machine. Image paths must be readable at the same path on every node
(a shared or object-storage mount; see docs/scaling.md).

Ray is an optional dependency (``pip install "embedsearch[ray]"``); nothing here imports it
at module import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.errors import EmbedsearchError, EncoderError

if TYPE_CHECKING:
    from embedsearch.embed import ItemInfo
    from embedsearch.encoders.base import Encoder

log = logging.getLogger(__name__)

INSTALL_HINT = 'install the optional extra: pip install "embedsearch[ray]"'
#: Ray's switch between "one machine, loopback" (0) and "cluster, interface address" (1).
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass
class RayOptions:
    """How to run the Ray engine.

    ``address`` connects to a running cluster (``ray://…`` or ``HOST:PORT``); without it a
    local Ray runtime is started for the build and stopped after it. ``num_workers`` encoder
    actors each reserve ``num_cpus`` CPUs and ``num_gpus`` GPUs and encode batches of
    ``batch_size`` images.
    """

    address: str | None = None
    num_workers: int = 1
    batch_size: int = 32
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    runtime_env: dict[str, Any] | None = None
    #: Extra ``ray.init`` keyword arguments for a runtime started here (tests, notebooks).
    init_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Silence Ray Data's per-execution INFO/WARNING logs (the CLI sets this unless --debug:
    #: its own progress bar and summary say the same).
    quiet: bool = False


def require_ray() -> Any:
    """Import ray (and ray.data), or raise a clear error saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise EmbedsearchError(f"--engine ray needs Ray, which is not installed ({exc})",
                               hint=INSTALL_HINT) from exc
    return ray


@contextlib.contextmanager
def ray_runtime(options: RayOptions) -> Iterator[Any]:
    """Connect to ``options.address`` or start a local runtime; shut down only what we began."""
    if not options.address and "ray" not in sys.modules:
        # On Linux Ray advertises a network interface's address unless this is off (read
        # when ray is imported); a runtime that only this process uses belongs on loopback.
        os.environ.setdefault(LOOPBACK_ENV, "0")
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    # We start or join this runtime on the user's behalf: no usage reporting over the network.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    if options.runtime_env:
        kwargs["runtime_env"] = options.runtime_env
    if options.address:
        kwargs["address"] = options.address
    else:
        # "local" always starts a new runtime; a bare ray.init() would instead join whatever
        # cluster `ray start` last left on this machine.
        kwargs.update(address="local", include_dashboard=False)
    kwargs.update(options.init_kwargs)
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = options.address or "a local Ray runtime"
        raise EmbedsearchError(f"could not start or reach {where}: {exc}",
                               hint="check --address (the head's HOST:PORT from `ray start "
                               "--head`), or leave it out to start a local runtime") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


class EncoderActor:
    """Ray Data actor: loads the encoder once, then turns batches of paths into vectors."""

    def __init__(self, spec: str, weights: str | None, precision: str, channels_last: bool,
                 expected_key: str, fingerprint: list[float], max_pixels: int,
                 use_gpu: bool = False, threads: int = 1) -> None:
        import torch

        from embedsearch.encoders import load_encoder
        from embedsearch.encoders.base import fingerprint_image
        from embedsearch.encoders.identity import (
            FINGERPRINT_MIN_COSINE,
            encoder_key,
            fingerprint_cosine,
        )

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.encoder = load_encoder(spec, weights, precision=precision,
                                    channels_last=channels_last, device=self.device)
        self.max_pixels = max_pixels
        found = encoder_key(self.encoder.identity())
        if found != expected_key:
            raise EncoderError(
                f"a Ray worker built encoder {spec} as {found!r}, but the driver's is "
                f"{expected_key!r}",
                hint="install the same embedsearch, library versions and weights file on every "
                "node (e.g. one container image for the whole cluster)")
        probe = self.encoder.transform(fingerprint_image())[None].to(self.device)
        cos = fingerprint_cosine(self.encoder.encode_tensors(probe)[0], fingerprint)
        if cos < FINGERPRINT_MIN_COSINE:
            raise EncoderError(
                f"a Ray worker's encoder {spec} embeds the reference image differently from the "
                f"driver's (cosine {cos:.4f})",
                hint="library versions or weights differ between nodes; use one environment "
                "for the whole cluster")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        import torch

        from embedsearch.data.images import DECODE_ERROR, LoadFailure, load_image

        cpu0, wall0 = time.process_time(), time.time()
        enc = self.encoder
        prep = enc.preprocess
        n = len(batch["pos"])
        status, detail, sha = [""] * n, [""] * n, [""] * n
        width, height = np.zeros(n, np.int64), np.zeros(n, np.int64)
        tensors, ok = [], []
        for j, p in enumerate(batch["path"]):
            loaded = load_image(Path(str(p)), target_size=enc.preprocess.resize,
                                max_pixels=self.max_pixels)
            if isinstance(loaded, LoadFailure):
                status[j], detail[j], sha[j] = loaded.reason, loaded.detail, loaded.sha256 or ""
                continue
            sha[j] = loaded.sha256
            try:  # the same split preprocessing as embed_sources: bit-identical vectors
                tensors.append(prep.worker_transform(loaded.image))
            except Exception as exc:  # one odd image must not stop the job (as in embed.py)
                status[j], detail[j] = DECODE_ERROR, f"preprocessing failed: {exc}"
                continue
            status[j], width[j], height[j] = "ok", loaded.width, loaded.height
            ok.append(j)
        vectors = np.zeros((n, enc.dim), np.float32)
        if tensors:
            vectors[ok] = enc.encode_tensors(prep.finish(torch.stack(tensors).to(self.device)))
        return {"pos": np.asarray(batch["pos"], np.int64), "status": np.array(status, object),
                "detail": np.array(detail, object), "sha256": np.array(sha, object),
                "width": width, "height": height, "vector": vectors,
                # What this batch cost the worker (CPU time spread over its rows) and when it
                # ran: stats for throughput that leave actor start-up out.
                "cpu_s": np.full(n, (time.process_time() - cpu0) / max(1, n)),
                "t_start": np.full(n, wall0), "t_end": np.full(n, time.time())}


def _user_error(exc: BaseException) -> EmbedsearchError | None:
    """The EmbedsearchError an actor raised, dug out of Ray's wrappers (if that is the cause)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, EmbedsearchError):
            return e
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


def encode_chunks(encoder: Encoder, paths: Sequence[Path], chunk_size: int,
                  options: RayOptions, *, max_pixels: int | None = None,
                  progress: Callable[[int], None] | None = None,
                  stats: dict[str, float] | None = None
                  ) -> Iterator[tuple[np.ndarray, list[ItemInfo]]]:
    """Yield, per consecutive chunk of ``chunk_size`` paths, (vectors of the decoded images,
    one ItemInfo per path) — the same contract as the local engine.

    Chunks come out in order as soon as each is complete, so the caller can commit it while
    the cluster keeps encoding the next ones. ``stats``, when given, accumulates
    ``worker_cpu_s`` (CPU seconds the actors spent), ``images``, and the first batch start
    and last batch end on the workers' clocks (``t_first``, ``t_last``).
    """
    from embedsearch.data.images import DEFAULT_MAX_PIXELS
    from embedsearch.embed import ItemInfo
    from embedsearch.encoders.identity import encoder_key

    if not paths:
        return
    if options.num_workers < 1 or options.batch_size < 1:
        raise EmbedsearchError("--ray-workers and --batch-size must be at least 1")
    import pyarrow as pa

    # Actors run in other working directories (and on other nodes): pass absolute paths.
    weights = (str(Path(encoder.weights.path).absolute())
               if encoder.weights.source == "file" and encoder.weights.path else None)
    with ray_runtime(options) as ray:
        if options.quiet:
            logging.getLogger("ray.data").setLevel(logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # chunks complete in order: commit early
        ctx.enable_progress_bars = False  # the CLI draws its own
        # An input block is the unit handed to an actor: at least ~4 per actor so all of
        # them work (and small jobs balance), at most one chunk so objects stay few.
        per = -(-len(paths) // (4 * options.num_workers))
        step = max(1, min(chunk_size, max(options.batch_size, per)))
        blocks = [pa.table({"pos": np.arange(s, min(s + step, len(paths)), dtype=np.int64),
                            "path": [str(Path(p).absolute()) for p in paths[s:s + step]]})
                  for s in range(0, len(paths), step)]
        n_chunks = -(-len(paths) // chunk_size)
        ds = ray.data.from_arrow(blocks).map_batches(
            EncoderActor,
            fn_constructor_kwargs={
                "spec": encoder.spec, "weights": weights, "precision": encoder.precision,
                "channels_last": encoder.channels_last,
                "expected_key": encoder_key(encoder.identity()),
                "fingerprint": [float(x) for x in encoder.fingerprint()],
                "max_pixels": max_pixels or DEFAULT_MAX_PIXELS,
                "use_gpu": options.num_gpus > 0, "threads": max(1, int(options.num_cpus)),
            },
            batch_size=options.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=options.num_workers),
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus or None,
        )
        pending: dict[int, tuple[ItemInfo, np.ndarray]] = {}
        next_chunk = 0
        try:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for j, pos in enumerate(out["pos"].tolist()):
                    info = ItemInfo(str(out["status"][j]), str(out["detail"][j]),
                                    str(out["sha256"][j]) or None, None,
                                    int(out["width"][j]), int(out["height"][j]))
                    pending[pos] = (info, out["vector"][j])
                if progress is not None:
                    progress(len(out["pos"]))
                if stats is not None:
                    stats["worker_cpu_s"] = stats.get("worker_cpu_s", 0.0) + float(
                        out["cpu_s"].sum())
                    stats["images"] = stats.get("images", 0) + len(out["pos"])
                    stats["t_first"] = min(stats.get("t_first", np.inf),
                                           float(out["t_start"].min()))
                    stats["t_last"] = max(stats.get("t_last", 0.0), float(out["t_end"].max()))
                while next_chunk < n_chunks:
                    start = next_chunk * chunk_size
                    stop = min(start + chunk_size, len(paths))
                    if any(i not in pending for i in range(start, stop)):
                        break
                    got = [pending.pop(i) for i in range(start, stop)]
                    infos = [info for info, _ in got]
                    vecs = [v for info, v in got if info.status == "ok"]
                    yield (np.stack(vecs).astype(np.float32, copy=False) if vecs
                           else np.zeros((0, encoder.dim), np.float32)), infos
                    next_chunk += 1
        except EmbedsearchError:
            raise
        except Exception as exc:
            user = _user_error(exc)
            if user is not None:
                raise user from exc
            raise
        if next_chunk != n_chunks:  # pragma: no cover - Ray lost rows without raising
            raise EmbedsearchError(f"the Ray job ended after {next_chunk} of {n_chunks} chunks",
                                   hint="run the build again: committed chunks are kept")
