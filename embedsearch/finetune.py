"""A fine-tuned baseline: the same backbone as the frozen encoder, trained end to end.

The tool's comparison is "frozen embeddings + a small head" against "a trained model";
``finetune`` is that trained model, made honestly comparable: the same backbone and
weights as the bundle's encoder, a linear classifier on its pooled features, training-time
augmentation (random resized crops and flips, as :mod:`embedsearch.views`), label
smoothing, AdamW with a cosine schedule, bf16 autocast on CUDA, and a budget (epochs and
minutes) that stops training early. Validation images choose the best epoch; test images
are scored once at the end. Wall, CPU and GPU seconds and the model's size are recorded so
a report can say what the frozen route saves.

Saved as ``weights.safetensors`` (backbone + classifier, float32; no pickle) and
``finetune.json`` (format, schema, the base encoder's identity, the weights file's sha256,
classes, settings, figures, costs). :func:`load_finetuned` verifies the hash and the base
encoder before loading.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.classify.metrics import class_counts, classification_figures
from embedsearch.errors import BundleError, EmbedsearchError

if TYPE_CHECKING:
    import torch

    from embedsearch.encoders.base import Encoder

log = logging.getLogger(__name__)

FINETUNE_FORMAT = "embedsearch-finetune"
FINETUNE_SCHEMA = 1
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "finetune.json"
BLOCKS = ("last", "all")
#: ``blocks="last"``: stages of the backbone's main sequence that train (plus all after it).
LAST_STAGES = 2
DEVICES = ("auto", "cpu", "cuda")

#: (path, label) pairs of one split.
Split = tuple[Sequence[Path], Sequence[str]]


@dataclass
class FinetuneResult:
    """What a fine-tune did: ``info`` is the ``finetune.json`` content."""

    path: Path | None
    info: dict[str, Any]
    classes: np.ndarray
    test_pred: np.ndarray
    test_proba: np.ndarray

    @property
    def test(self) -> dict[str, Any]:
        return dict(self.info.get("test", {}))


def resolve_device(device: str = "auto") -> str:
    import torch

    if device not in DEVICES:
        raise EmbedsearchError(f"unknown device {device!r}", hint=f"use one of {DEVICES}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EmbedsearchError("--device cuda: no CUDA device is available",
                               hint="use --device cpu (slow: give it a --budget-minutes)")
    return device


def _trunk(model: torch.nn.Module) -> torch.nn.Module | None:
    """The backbone's main sequence of stages: the direct child Sequential/ModuleList with
    the most parameters (timm's ``blocks``, torchvision's ``features``)."""
    import torch

    best, size = None, 0
    for child in model.children():
        if isinstance(child, torch.nn.Sequential | torch.nn.ModuleList) and len(child) >= 3:
            n = sum(p.numel() for p in child.parameters())
            if n > size:
                best, size = child, n
    return best


def set_trainable(model: torch.nn.Module, blocks: str) -> tuple[int, int]:
    """Unfreeze ``all`` parameters, or the ``last`` LAST_STAGES stages of the trunk and
    every parameter registered after them (the final conv / norm). Returns (trainable,
    total) parameter counts."""
    if blocks not in BLOCKS:
        raise EmbedsearchError(f"unknown --blocks {blocks!r}", hint=f"use one of {BLOCKS}")
    params = list(model.named_parameters())
    start = 0
    if blocks == "last":
        trunk = _trunk(model)
        if trunk is None:
            raise EmbedsearchError(f"cannot find the stages of {type(model).__name__} to "
                                   "fine-tune the last ones", hint="use --blocks all")
        first = {id(p) for p in trunk[-LAST_STAGES].parameters()}
        start = next(i for i, (_, p) in enumerate(params) if id(p) in first)
    for i, (_, p) in enumerate(params):
        p.requires_grad_(i >= start)
    total = sum(p.numel() for _, p in params)
    return sum(p.numel() for _, p in params[start:]), total


class _Images:
    """Dataset of (image tensor, class index): safe decode, then a train or eval transform."""

    def __init__(self, paths: Sequence[Path], y: np.ndarray, transform: Callable[[Any], Any],
                 target_size: int) -> None:
        self.paths, self.y, self.transform, self.target_size = list(paths), y, transform, \
            target_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from embedsearch.data.images import LoadFailure, load_image

        loaded = load_image(self.paths[i], target_size=self.target_size)
        if isinstance(loaded, LoadFailure):
            raise EmbedsearchError(f"{self.paths[i]}: {loaded.reason} {loaded.detail}",
                                   hint="remove the file or fix it; build-index lists every "
                                   "unreadable file with its reason")
        return self.transform(loaded.image), int(self.y[i])


def _train_transform(encoder: Encoder) -> Callable[[Any], Any]:
    from torchvision import transforms as T

    from embedsearch.views import CROP_RATIO, CROP_SCALE

    prep = encoder.preprocess
    interp = T.InterpolationMode(prep.interpolation)
    return T.Compose([T.RandomResizedCrop(prep.crop, scale=CROP_SCALE, ratio=CROP_RATIO,
                                          interpolation=interp),
                      T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(prep.mean, prep.std)])


def _classifier(encoder: Encoder, n_classes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone → pooled features → linear layer as one module, the backbone's own
    network) for a private copy of ``encoder``: its ``_forward`` (CLIP's image tower, …)
    computes the features, so they are exactly what the bundle's embeddings were before
    normalisation."""
    import torch

    enc = copy.deepcopy(encoder)
    body = enc.model.float()

    class Backbone(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return enc._forward(x)

    return torch.nn.Sequential(Backbone(), torch.nn.Linear(enc.dim, n_classes)), body


class _Schedule:
    """Linear warm-up then cosine decay over ``planned`` steps; :meth:`fit_budget` shortens
    the plan once the step time is known, so a budget cut still ends at a low rate."""

    WARMUP = 0.1
    #: Share of the budget kept for validation passes and the final test pass.
    EVAL_SHARE = 0.15

    def __init__(self, planned: int) -> None:
        self.planned = self.full = max(1, planned)

    def __call__(self, step: int) -> float:
        warm = max(1, int(self.WARMUP * self.planned))
        if step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, self.planned - warm))
        return 0.5 * (1 + float(np.cos(np.pi * frac)))

    def fit_budget(self, done: int, elapsed: float, budget: float) -> None:
        """Re-plan to what the budget affords at the step time measured so far, up to the
        full plan: the estimate may grow back (the first steps pay start-up costs, a busy
        machine gets quiet), where only shrinking it once ended a 10-minute clothing-small
        budget after 284 s, on the estimate of its first 5 steps."""
        per_step = elapsed / max(done, 1)
        affordable = int(budget * (1 - self.EVAL_SHARE) / per_step)
        self.planned = max(done + 1, min(self.full, affordable))


def _loader(ds: _Images, batch_size: int, shuffle: bool, seed: int, workers: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g,
                                       num_workers=workers, drop_last=False)


def _predict(net: torch.nn.Module, loader: Any, device: str) -> np.ndarray:
    import torch

    net.eval()
    out = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16,
                                                enabled=device == "cuda"):
        for x, _ in loader:
            out.append(torch.softmax(net(x.to(device)).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def finetune_split(train: Split, val: Split | None, test: Split | None, *,
                   model: str | None = None, weights: str | os.PathLike[str] | None = None,
                   blocks: str = "last", epochs: int = 4, budget_minutes: float | None = None,
                   device: str = "auto", batch_size: int = 32, lr: float = 3e-4,
                   label_smoothing: float = 0.1, seed: int = 0, num_workers: int | None = None,
                   out: str | os.PathLike[str] | None = None,
                   on_step: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune ``model`` on explicit ``train`` (and ``val``, ``test``) image splits.

    ``val`` picks the best epoch (without it, the last one is kept); ``test`` is scored at
    the end, for the record only. Training stops after ``epochs`` or when
    ``budget_minutes`` of wall time are used, whichever comes first (checked every batch).
    """
    import torch

    from embedsearch.encoders import DEFAULT_ENCODER, load_encoder

    if epochs < 1:
        raise EmbedsearchError(f"epochs must be at least 1, got {epochs}")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    encoder = load_encoder(model or DEFAULT_ENCODER, weights, backend="torch")
    identity = encoder.identity()
    classes = np.unique(np.asarray(train[1]).astype(str))
    if len(classes) < 2:
        raise EmbedsearchError(f"fine-tuning needs at least two classes, found {len(classes)}")

    def idx(split: Split) -> np.ndarray:
        labels = np.asarray(split[1]).astype(str)
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            log.info("classes %s are not in the training images: never predicted", unknown)
        return np.searchsorted(classes, labels).clip(0, len(classes) - 1)

    net, body = _classifier(encoder, len(classes))
    trainable, total = set_trainable(body, blocks)
    net = net.to(dev)
    prep = encoder.preprocess
    workers = num_workers if num_workers is not None else (4 if dev == "cuda" else 0)
    train_ds = _Images(train[0], idx(train), _train_transform(encoder), prep.resize)
    train_dl = _loader(train_ds, batch_size, True, seed, workers)

    def eval_loader(split: Split | None) -> Any:
        if split is None or len(split[0]) == 0:
            return None
        return _loader(_Images(split[0], idx(split), prep.transform, prep.resize),
                       batch_size, False, seed, workers)

    val_dl, test_dl = eval_loader(val), eval_loader(test)
    head_params = list(net[1].parameters())
    body_params = [p for p in net[0].parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": body_params, "lr": lr},
                             {"params": head_params, "lr": lr * 10}], weight_decay=0.05)
    plan = _Schedule(epochs * len(train_dl))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    budget_s = budget_minutes * 60 if budget_minutes else None
    say = on_step or (lambda msg: log.info("%s", msg))

    gpu_ms = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, Any]] | None = None
    stopped_by = "epochs"
    step = 0
    for epoch in range(1, epochs + 1):
        net.train()
        for m in net.modules():  # frozen statistics: small batches would only add noise
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        seen, loss_sum = 0, 0.0
        start_evt = end_evt = None
        if dev == "cuda":
            start_evt, end_evt = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start_evt.record()
        for x, y in train_dl:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
                loss = loss_fn(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            step += 1
            elapsed = time.perf_counter() - t0
            if budget_s is not None and (step == 5 or step % 25 == 0):
                # Re-plan from the measured step time (it grows when the machine gets busy).
                plan.fit_budget(step, elapsed, budget_s)
            if step >= plan.planned or (budget_s is not None and elapsed > budget_s):
                stopped_by = "budget" if step < epochs * len(train_dl) else "epochs"
                break
        if start_evt is not None and end_evt is not None:
            end_evt.record()
            torch.cuda.synchronize()
            gpu_ms += start_evt.elapsed_time(end_evt)
        entry: dict[str, Any] = {"epoch": epoch, "images": seen,
                                 "train_loss": round(loss_sum / max(seen, 1), 4),
                                 "seconds": round(time.perf_counter() - t0, 1)}
        score = -float(epoch)
        if val_dl is not None:
            proba = _predict(net, val_dl, dev)
            figs = classification_figures(np.asarray(val[1]).astype(str),  # type: ignore[index]
                                          classes[proba.argmax(1)])
            entry["val_accuracy"] = figs["accuracy"]
            score = figs["accuracy"]
        history.append(entry)
        say(f"epoch {epoch}: {entry}")
        if best is None or score > best[0] or val_dl is None:
            best = (score, epoch, {k: v.detach().clone() for k, v in net.state_dict().items()})
        if step >= plan.planned or stopped_by == "budget":
            break
    train_seconds = time.perf_counter() - t0
    train_cpu = time.process_time() - c0
    assert best is not None
    net.load_state_dict(best[2])

    info: dict[str, Any] = {
        "format": FINETUNE_FORMAT, "schema_version": FINETUNE_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_encoder": identity,
        "classes": classes.tolist(),
        "settings": {"blocks": blocks, "last_stages": LAST_STAGES if blocks == "last" else None,
                     "epochs": epochs, "budget_minutes": budget_minutes, "lr": lr,
                     "head_lr": lr * 10, "weight_decay": 0.05, "batch_size": batch_size,
                     "label_smoothing": label_smoothing, "seed": seed, "device": dev,
                     "precision": "bf16 autocast" if dev == "cuda" else "fp32",
                     "augmentation": "random resized crop (scale 0.35-1) + horizontal flip",
                     "batchnorm": "running statistics frozen"},
        "parameters": {"trainable": trainable + sum(p.numel() for p in head_params),
                       "total": total + sum(p.numel() for p in head_params)},
        "counts": {"train": class_counts(train[1]),
                   **({"val": class_counts(val[1])} if val_dl is not None and val else {}),
                   **({"test": class_counts(test[1])} if test_dl is not None and test else {})},
        "history": history, "best_epoch": best[1], "stopped_by": stopped_by,
        "epochs_run": round(step / len(train_dl), 2), "steps": step,
    }
    t_eval = time.perf_counter()
    test_proba = np.zeros((0, len(classes)))
    test_pred = np.array([], dtype=str)
    if test_dl is not None and test is not None:
        test_proba = _predict(net, test_dl, dev)
        test_pred = classes[test_proba.argmax(1)]
        info["test"] = classification_figures(np.asarray(test[1]).astype(str), test_pred,
                                              test_proba, classes)
    n_test = len(test_pred)
    info["timings"] = {
        "train_wall_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(train_cpu, 3),
        "train_gpu_seconds": round(gpu_ms / 1000, 1) if dev == "cuda" else None,
        "test_ms_per_image": round(1000 * (time.perf_counter() - t_eval) / n_test, 2)
        if n_test else None,
    }
    path = None
    if out is not None:
        path = Path(out)
        _save(path, net, info)
    else:
        info["model_bytes"] = int(sum(v.numel() * v.element_size()
                                      for v in net.state_dict().values()))
    return FinetuneResult(path, info, classes, test_pred, test_proba)


def _save(folder: Path, net: torch.nn.Module, info: dict[str, Any]) -> None:
    """weights.safetensors, then finetune.json (the commit point) with its sha256."""
    from safetensors.torch import save

    from embedsearch.store.io import atomic_write, write_json
    from embedsearch.store.verify import file_record

    state = {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()
             if v.is_floating_point()}
    data = save(state, metadata={"format": FINETUNE_FORMAT})
    atomic_write(folder / WEIGHTS_FILE, lambda fh: fh.write(data))
    info["files"] = {WEIGHTS_FILE: file_record(folder / WEIGHTS_FILE)}
    info["model_bytes"] = len(data)
    write_json(folder / META_FILE, info)


@dataclass
class FinetunedModel:
    """A loaded fine-tuned classifier: ``predict_proba(paths)`` with ``classes_``."""

    net: Any
    encoder: Encoder
    classes_: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, paths: Sequence[Path], batch_size: int = 32) -> np.ndarray:
        prep = self.encoder.preprocess
        ds = _Images(paths, np.zeros(len(paths), np.int64), prep.transform, prep.resize)
        return _predict(self.net, _loader(ds, batch_size, False, 0, 0), "cpu")


def load_finetuned(folder: str | os.PathLike[str],
                   weights: str | os.PathLike[str] | None = None) -> FinetunedModel:
    """Load a saved fine-tune, refusing a modified weights file or another base encoder."""
    from safetensors.torch import load_file

    from embedsearch.encoders import load_encoder
    from embedsearch.encoders.identity import check_same_encoder
    from embedsearch.store.io import read_versioned_json
    from embedsearch.store.verify import file_mismatch

    folder = Path(folder)
    info = read_versioned_json(folder / META_FILE, FINETUNE_FORMAT, FINETUNE_SCHEMA,
                               "fine-tuned model", "fine-tune again with this version")
    meta = info.get("files", {}).get(WEIGHTS_FILE, {})
    wfile = folder / WEIGHTS_FILE
    if file_mismatch(wfile, {"sha256": meta.get("sha256")}) is not None:
        raise BundleError(f"{wfile} is missing or does not match {folder / META_FILE}",
                          hint="fine-tune again: embedsearch finetune DATA --out " + str(folder))
    base = info["base_encoder"]
    w = base.get("weights", {})
    if weights is None and w.get("source") == "file":
        weights = w.get("path")
    encoder = load_encoder(base["spec"], weights, precision=base.get("precision", "fp32"),
                            backend="torch")
    check_same_encoder(base, encoder.identity(), f"fine-tuned model {folder}",
                       "load it with the base encoder's weights (--weights FILE)")
    net, _ = _classifier(encoder, len(info["classes"]))
    missing, unexpected = net.load_state_dict(load_file(str(wfile)), strict=False)
    floats = {k for k, v in net.state_dict().items() if v.is_floating_point()}
    if set(missing) & floats or unexpected:
        raise BundleError(f"{wfile} does not fit {base['spec']}: missing "
                          f"{sorted(set(missing) & floats)[:3]}, unexpected {unexpected[:3]}")
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return FinetunedModel(net, encoder, np.asarray(info["classes"]), info)


def finetune(data: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None,
             path_col: str | None = None, label_col: str | None = None,
             split_col: str | None = None, seed: int = 0, **options: Any) -> FinetuneResult:
    """Fine-tune on a labelled collection: its ``train`` images train, ``val`` images choose
    the epoch (without them a stratified 15 % of train is held out), ``test`` images are
    scored at the end. ``options`` go to :func:`finetune_split` (model, weights, blocks,
    epochs, budget_minutes, device, batch_size, lr…)."""
    from embedsearch.classify.base import stratified_holdout
    from embedsearch.data.scan import scan

    coll = scan(data, path_col=path_col, label_col=label_col, split_col=split_col)
    recs = [r for r in coll.records if r.label is not None]
    if not recs:
        raise EmbedsearchError(f"{data} has no labelled images to fine-tune on",
                               hint="use a folder with one sub-folder per class")

    def split(names: set[str | None]) -> tuple[list[Path], list[str]]:
        chosen = [r for r in recs if r.split in names]
        return [r.path for r in chosen], [str(r.label) for r in chosen]

    train, val, test = split({"train", None}), split({"val"}), split({"test"})
    if not val[0]:
        y_idx = np.unique(train[1], return_inverse=True)[1]
        mask = stratified_holdout(y_idx, 0.15, seed)
        val = ([p for p, m in zip(train[0], mask, strict=True) if m],
               [lbl for lbl, m in zip(train[1], mask, strict=True) if m])
        train = ([p for p, m in zip(train[0], mask, strict=True) if not m],
                 [lbl for lbl, m in zip(train[1], mask, strict=True) if not m])
    return finetune_split(train, val, test if test[0] else None, out=out, seed=seed, **options)
