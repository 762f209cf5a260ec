"""Small trained heads over cached embeddings: multinomial logistic regression and an MLP.

Both share the KNNClassifier contract (``fit`` / ``predict_proba`` / ``predict`` with
``classes_`` sorted like scikit-learn) and both predict with plain numpy from float32
arrays, so a head saved as ``weights.safetensors`` + ``head.json`` loads without pickle,
without scikit-learn and without torch, and gives bit-identical predictions after loading.

Protocol, the same for both kinds:

* inputs are standardised with the training mean/std, folded into the first layer's
  weights when training ends (nothing extra to store or apply);
* hyper-parameters are chosen on the validation rows (``X_val``) when given; otherwise the
  linear head cross-validates and the MLP holds out a stratified 15 % of the training rows;
* the validation figures reported in ``info["validation"]`` always come from a model that
  never saw those rows; the final weights are then refit on train + validation with the
  chosen setting (``refit=False`` keeps the train-only model).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from embedsearch.classify.metrics import (
    balanced_weights,
    class_counts,
    classification_figures,
    softmax,
)
from embedsearch.errors import BundleError, EmbedsearchError
from embedsearch.store.io import file_digest, read_versioned_json, write_json

log = logging.getLogger(__name__)

HEAD_FORMAT = "embedsearch-head"
HEAD_SCHEMA = 1
HEAD_KINDS = ("linear", "mlp")
CLASS_WEIGHTS = ("auto", "balanced", "none")
#: ``class_weight="auto"`` turns balancing on when the largest class is over this many
#: times the smallest.
IMBALANCE_RATIO = 3.0
#: Inverse regularisation strengths tried by the linear head (on standardised inputs).
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
WEIGHTS_FILE = "weights.safetensors"
HEAD_FILE = "head.json"
#: ``extra_train``: (vectors, labels) or (vectors, labels, source row in the training matrix).
ExtraTrain = tuple[np.ndarray, Any] | tuple[np.ndarray, Any, np.ndarray]


def _as_matrix(X: np.ndarray, what: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(X)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        expect = f"(n, {dim})" if dim is not None else "(n, dim)"
        raise EmbedsearchError(f"{what} have shape {tuple(x.shape)}, expected {expect}",
                               hint="use embeddings from the encoder the head was trained on")
    if not np.isfinite(x).all():
        raise EmbedsearchError(f"{what} contain NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


def resolve_class_weight(mode: str, counts: dict[str, int]) -> str:
    """``auto`` → ``balanced`` when max count > IMBALANCE_RATIO × min count, else ``none``."""
    if mode not in CLASS_WEIGHTS:
        raise EmbedsearchError(f"unknown class weight {mode!r}", hint=f"use one of {CLASS_WEIGHTS}")
    if mode != "auto":
        return mode
    n = list(counts.values())
    return "balanced" if n and max(n) > IMBALANCE_RATIO * min(n) else "none"


def stratified_holdout(y_idx: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of a stratified ``fraction`` of rows (at least one per class that has
    two or more rows, never a class's last row)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y_idx), bool)
    for c in np.unique(y_idx):
        rows = np.flatnonzero(y_idx == c)
        if len(rows) < 2:
            continue
        take = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        mask[rng.choice(rows, take, replace=False)] = True
    return mask


def stratified_folds(y_idx: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number per row: each class's rows shuffled and dealt round-robin."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y_idx), np.int64)
    offset = 0
    for c in np.unique(y_idx):
        rows = rng.permutation(np.flatnonzero(y_idx == c))
        fold[rows] = (np.arange(len(rows)) + offset) % folds
        offset += len(rows)  # spreads the classes' remainders over different folds
    return fold


def fit_multinomial(Z: np.ndarray, y_idx: np.ndarray, n_classes: int, sw: np.ndarray,
                    C: float, x0: np.ndarray | None = None, max_iter: int = 500
                    ) -> tuple[np.ndarray, int]:
    """L2-regularised multinomial logistic regression by L-BFGS-B.

    The objective is scikit-learn's (``LogisticRegression(C=C)``, lbfgs), so C means the
    same: ``Σ sw·CE / Σ sw + ||W||² / (2·C·Σ sw)``, intercept not penalised. Written out
    because scikit-learn's float64 loss runs several times slower on 2 cores, and the
    float32 matmuls here are the whole cost. Returns (flat [W, b], iterations).
    """
    from scipy.optimize import minimize

    n, d = Z.shape
    ZT = np.ascontiguousarray(Z.T)  # G.T @ Z is several times slower than ZT @ G
    Y = np.zeros((n, n_classes), np.float32)
    Y[np.arange(n), y_idx] = 1.0
    total = float(sw.sum())
    swn = (sw / total).astype(np.float32)[:, None]
    alpha = 1.0 / (C * total)

    def loss_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        W = x[: n_classes * d].reshape(n_classes, d).astype(np.float32)
        b = x[n_classes * d:].astype(np.float32)
        logits = Z @ W.T + b
        logits -= logits.max(axis=1, keepdims=True)
        expl = np.exp(logits)
        norm = expl.sum(axis=1, keepdims=True)
        logp = logits - np.log(norm)
        loss = -float((swn * Y * logp).sum(dtype=np.float64))
        G = swn * (expl / norm - Y)
        gW = (ZT @ G).T.astype(np.float64) + alpha * x[: n_classes * d].reshape(n_classes, d)
        loss += 0.5 * alpha * float(x[: n_classes * d] @ x[: n_classes * d])
        return loss, np.concatenate([gW.ravel(), G.sum(axis=0, dtype=np.float64)])

    start = np.zeros(n_classes * (d + 1)) if x0 is None else x0
    with single_blas_thread():
        res = minimize(loss_grad, start, jac=True, method="L-BFGS-B",
                       options={"maxiter": max_iter, "maxls": 50, "gtol": 1e-4,
                                "ftol": 64 * np.finfo(float).eps})
    return res.x, int(res.nit)


def single_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread: for (n × d) @ (d × classes) products OpenBLAS threads cost
    more in spin-waiting than they gain (measured 5× slower with 2 threads on 2 busy cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # it ships with scikit-learn, but the heads do not need it
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


class Head:
    """Shared plumbing: labels, class weights, standardisation, numpy prediction, files."""

    kind: ClassVar[str] = ""
    _in_key: ClassVar[str] = ""  # the (outputs, inputs) weight matrix of the first layer

    def __init__(self, class_weight: str = "auto", seed: int = 0, refit: bool = True) -> None:
        if class_weight not in CLASS_WEIGHTS:
            raise EmbedsearchError(f"unknown class weight {class_weight!r}",
                                   hint=f"use one of {CLASS_WEIGHTS}")
        self.class_weight = class_weight
        self.seed = int(seed)
        self.refit = refit
        self.classes_: np.ndarray = np.array([], dtype=str)
        self.params: dict[str, np.ndarray] = {}
        #: Everything ``head.json`` records about training: counts, choice, figures, time.
        self.info: dict[str, Any] = {}

    # -- contract -------------------------------------------------------------------------
    def fit(self, X: np.ndarray, y: Sequence[str] | np.ndarray, X_val: np.ndarray | None = None,
            y_val: Sequence[str] | np.ndarray | None = None, *,
            extra_train: ExtraTrain | None = None) -> Head:
        """Fit on ``X``/``y``; ``X_val``/``y_val`` (optional) choose the settings.

        ``extra_train`` = ``(X_extra, y_extra)`` or ``(X_extra, y_extra, source)``: more
        training rows (e.g. embeddings of augmented views) used for training only, never
        scored for selection or validation figures. ``source[i]`` is the row of ``X`` that
        view ``i`` was made from (-1 when unknown); when the head holds rows of ``X`` out
        for its own selection (no ``X_val``), views of held-out rows are left out of that
        fit, and views without a source are used only when no row of ``X`` is held out.
        """
        t0 = time.perf_counter()
        X = _as_matrix(X, "training vectors")
        labels = np.asarray(y).astype(str)
        if len(labels) != len(X):
            raise EmbedsearchError(f"{len(X)} vectors but {len(labels)} labels")
        self.classes_, y_idx = np.unique(labels, return_inverse=True)
        if len(self.classes_) < 2:
            raise EmbedsearchError(
                f"a head needs at least two classes, found {len(self.classes_)} "
                f"({', '.join(self.classes_) or 'none'})",
                hint="kNN search still works; label more classes to train a head")
        self._extra = self._extra_rows(extra_train, X.shape[1], len(X))
        if X_val is not None and y_val is not None and len(y_val) > 0:
            X_val = _as_matrix(X_val, "validation vectors", X.shape[1])
            val_labels = np.asarray(y_val).astype(str)
            known = np.isin(val_labels, self.classes_)
            if not known.all():
                # A class seen only in validation cannot be learnt from train; it still counts
                # against the head in the validation figures through those rows' predictions.
                log.warning("%d validation rows have classes absent from training",
                            int((~known).sum()))
            val_idx = np.searchsorted(self.classes_, val_labels)
            val_idx[~known] = -1
        else:
            X_val, val_labels, val_idx = None, None, None
        counts = class_counts(labels)
        mode = resolve_class_weight(self.class_weight, counts)
        cw = (balanced_weights(y_idx, len(self.classes_)) if mode == "balanced"
              else np.ones(len(self.classes_)))
        self.info = {
            "counts": {"train": counts,
                       **({"val": class_counts(val_labels)} if val_labels is not None else {})},
            "class_weight": {"requested": self.class_weight, "used": mode,
                             **({"weights": {str(c): round(float(w), 4) for c, w
                                             in zip(self.classes_, cw, strict=True)}}
                                if mode == "balanced" else {})},
        }
        self._fit(X, y_idx, cw, X_val, val_idx, val_labels)
        self.info["train_seconds"] = round(time.perf_counter() - t0, 3)
        return self

    def _extra_rows(self, extra: ExtraTrain | None, dim: int, n: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Checked ``extra_train``: (vectors, class indices, source rows with -1 unknown)."""
        if extra is None:
            return None
        if len(extra) not in (2, 3):
            raise EmbedsearchError(f"extra_train has {len(extra)} parts, expected "
                                   "(vectors, labels) or (vectors, labels, source rows)")
        Xe = _as_matrix(extra[0], "extra training vectors", dim)
        ye = np.asarray(extra[1]).astype(str)
        src = (np.asarray(extra[2], np.int64) if len(extra) == 3
               else np.full(len(ye), -1, np.int64))
        if not len(Xe) == len(ye) == len(src):
            raise EmbedsearchError(f"extra_train: {len(Xe)} vectors, {len(ye)} labels, "
                                   f"{len(src)} source rows; expected the same number")
        unknown = sorted(set(ye) - set(self.classes_.tolist()))
        if unknown:
            raise EmbedsearchError(f"extra_train has classes absent from training: {unknown}",
                                   hint="extra rows add views of training images, not classes")
        if len(src) and (src.max() >= n or src.min() < -1):
            raise EmbedsearchError(f"extra_train source rows must be -1 or 0..{n - 1}")
        return Xe, np.searchsorted(self.classes_, ye), src

    def _with_extra(self, X: np.ndarray, y_idx: np.ndarray, rows: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """``X``/``y_idx`` plus the extra rows allowed in a fit on ``rows`` of the original
        training matrix (None: all of it, so every extra row)."""
        extra = getattr(self, "_extra", None)
        if extra is None:
            return X, y_idx
        Xe, ye, src = extra
        keep = np.ones(len(ye), bool) if rows is None else np.isin(src, rows) & (src >= 0)
        if not keep.any():
            return X, y_idx
        return np.vstack([X, Xe[keep]]), np.concatenate([y_idx, ye[keep]])

    def _extra_count(self) -> int:
        extra = getattr(self, "_extra", None)
        return 0 if extra is None else len(extra[1])

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Logits, one column per entry of ``classes_``."""
        self._check_fitted()
        return self._logits(self.params, _as_matrix(X, "vectors", self.dim))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    @property
    def dim(self) -> int:
        self._check_fitted()
        return int(self.params[self._in_key].shape[1])

    def hyperparameters(self) -> dict[str, Any]:
        return {"class_weight": self.class_weight, "seed": self.seed, "refit": self.refit}

    # -- subclass hooks -------------------------------------------------------------------
    def _fit(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray, X_val: np.ndarray | None,
             val_idx: np.ndarray | None, val_labels: np.ndarray | None) -> None:
        raise NotImplementedError

    @staticmethod
    def _logits(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not self.params:
            raise EmbedsearchError(f"this {self.kind} head is not fitted")

    def _figures(self, params: dict[str, np.ndarray], X: np.ndarray, labels: np.ndarray
                 ) -> dict[str, Any]:
        proba = softmax(self._logits(params, X))
        return classification_figures(labels, self.classes_[proba.argmax(1)], proba,
                                      self.classes_)

    # -- files ----------------------------------------------------------------------------
    def save(self, folder: str | Path, encoder: dict[str, Any] | None = None,
             extra: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
        """Write ``weights.safetensors`` then ``head.json`` into ``folder`` atomically.

        Returns ``{file name: {"bytes", "sha256"}}`` for a manifest to record.
        """
        from safetensors.numpy import save as st_save

        from embedsearch import __version__
        from embedsearch.store.io import atomic_write

        self._check_fitted()
        folder = Path(folder)
        blob = st_save({k: np.ascontiguousarray(v, np.float32) for k, v in self.params.items()},
                       metadata={"format": HEAD_FORMAT, "kind": self.kind})
        atomic_write(folder / WEIGHTS_FILE, lambda fh: fh.write(blob))
        digest = file_digest(folder / WEIGHTS_FILE)
        meta = {
            "format": HEAD_FORMAT,
            "schema_version": HEAD_SCHEMA,
            "kind": self.kind,
            "embedsearch_version": __version__,
            "classes": [str(c) for c in self.classes_],
            "dim": self.dim,
            "hyperparameters": self.hyperparameters(),
            **self.info,
            "weights": {"file": WEIGHTS_FILE, "bytes": len(blob), "sha256": digest,
                        "tensors": {k: list(v.shape) for k, v in self.params.items()}},
            "encoder": encoder,
            **(extra or {}),
        }
        write_json(folder / HEAD_FILE, meta)
        return {name: {"bytes": (folder / name).stat().st_size,
                       "sha256": file_digest(folder / name)}
                for name in (WEIGHTS_FILE, HEAD_FILE)}


class LinearHead(Head):
    """Multinomial logistic regression (scikit-learn lbfgs) with C chosen on validation.

    C is picked by the lowest validation log loss (weighted like training when classes are
    balanced), a smooth criterion that also favours honest probabilities; accuracy on a
    few hundred validation images moves in steps and ties often.
    """

    kind = "linear"
    _in_key = "coef"

    def __init__(self, C: float | None = None, class_weight: str = "auto", seed: int = 0,
                 refit: bool = True, grid: Sequence[float] = C_GRID, cv_folds: int = 5,
                 max_iter: int = 500) -> None:
        super().__init__(class_weight, seed, refit)
        self.C = C
        self.grid = tuple(float(c) for c in ([C] if C is not None else grid))
        self.cv_folds = cv_folds
        self.max_iter = max_iter

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "C": self.C, "grid": list(self.grid),
                "cv_folds": self.cv_folds, "max_iter": self.max_iter, "solver": "lbfgs",
                "standardise": True}

    @staticmethod
    def _logits(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        return X @ params["coef"].T + params["intercept"]

    def _path(self, X: np.ndarray, y_idx: np.ndarray, sw: np.ndarray, grid: Sequence[float],
              init: dict[str, np.ndarray] | None = None) -> list[dict[str, np.ndarray]]:
        """Fit every C of ``grid`` (ascending, each warm-started from the previous one, the
        first from ``init`` when given). Returns float32 params in raw input space (the
        standardisation folded in)."""
        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
        std[std < 1e-8] = 1.0
        Z = ((X - mean) / std).astype(np.float32)
        n_classes = len(self.classes_)
        x0 = np.zeros(n_classes * (X.shape[1] + 1))
        if init is not None:
            coef = init["coef"].astype(np.float64)
            x0 = np.concatenate([(coef * std).ravel(), init["intercept"] + coef @ mean])
        out = []
        for C in grid:
            x0, iters = fit_multinomial(Z, y_idx, n_classes, sw, C, x0, self.max_iter)
            W = x0[: n_classes * X.shape[1]].reshape(n_classes, X.shape[1])
            b = x0[n_classes * X.shape[1]:]
            coef = W / std
            out.append({"coef": coef.astype(np.float32),
                        "intercept": (b - coef @ mean).astype(np.float32),
                        "_iter": np.array([iters])})
        return out

    def _score(self, params: dict[str, np.ndarray], X: np.ndarray, idx: np.ndarray,
               cw: np.ndarray) -> float:
        """Weighted log loss on rows whose class is known (lower is better)."""
        ok = idx >= 0
        proba = softmax(self._logits(params, X[ok]))
        p = np.clip(proba[np.arange(ok.sum()), idx[ok]], 1e-12, 1.0)
        w = cw[idx[ok]]
        return float(-(w * np.log(p)).sum() / w.sum())

    def _fit(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray, X_val: np.ndarray | None,
             val_idx: np.ndarray | None, val_labels: np.ndarray | None) -> None:
        grid = sorted(self.grid)
        sw = cw[y_idx]
        path: list[dict[str, np.ndarray]] = []
        table: list[dict[str, Any]] = []
        if X_val is not None and val_idx is not None and val_labels is not None:
            protocol = "validation split"
            Xa, ya = self._with_extra(X, y_idx, None)
            path = self._path(Xa, ya, cw[ya], grid)
            losses = [self._score(p, X_val, val_idx, cw) for p in path]
            best = int(np.argmin(losses))
            for C, p, loss in zip(grid, path, losses, strict=True):
                table.append({"C": C, "val_loss": round(loss, 4),
                              "val_macro_f1": self._figures(p, X_val, val_labels)["macro_f1"]})
            figures = self._figures(path[best], X_val, val_labels)
            final_X, final_y = np.vstack([X, X_val[val_idx >= 0]]), \
                np.concatenate([y_idx, val_idx[val_idx >= 0]])
            iters = int(path[best]["_iter"][0])
        else:
            min_count = int(np.bincount(y_idx).min())
            folds = min(self.cv_folds, min_count)
            final_X, final_y = X, y_idx
            if folds < 2 or len(grid) == 1:
                protocol = ("fixed C" if len(grid) == 1 else
                            "none (a class has a single example: the grid's middle C)")
                best, figures = len(grid) // 2, {}
                iters = 0
            else:
                protocol = f"{folds}-fold cross-validation"
                oof = [np.zeros((len(X), len(self.classes_))) for _ in grid]
                fold = stratified_folds(y_idx, folds, self.seed)
                for f in range(folds):
                    tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
                    Xa, ya = self._with_extra(X[tr], y_idx[tr], tr)
                    for j, p in enumerate(self._path(Xa, ya, cw[ya], grid)):
                        logits = self._logits(p, X[te])
                        if len(np.unique(y_idx[tr])) < len(self.classes_):
                            logits[:, np.setdiff1d(np.arange(len(self.classes_)),
                                                   np.unique(y_idx[tr]))] = -np.inf
                        oof[j][te] = softmax(logits)
                losses = []
                labels = self.classes_[y_idx]
                for C, proba in zip(grid, oof, strict=True):
                    p = np.clip(proba[np.arange(len(X)), y_idx], 1e-12, 1.0)
                    loss = float(-(sw * np.log(p)).sum() / sw.sum())
                    losses.append(loss)
                    f = classification_figures(labels, self.classes_[proba.argmax(1)])
                    table.append({"C": C, "val_loss": round(loss, 4),
                                  "val_macro_f1": f["macro_f1"]})
                best = int(np.argmin(losses))
                figures = classification_figures(labels, self.classes_[oof[best].argmax(1)],
                                                 oof[best], self.classes_)
                iters = 0
        chosen = grid[best]
        if self.refit or X_val is None:
            start = path[best] if X_val is not None else None
            final_X, final_y = self._with_extra(final_X, final_y, None)
            final = self._path(final_X, final_y, cw[final_y], [chosen], start)[0]
        else:
            final = path[best]
        iters = int(final["_iter"][0]) or iters
        self.params = {"coef": final["coef"], "intercept": final["intercept"]}
        self.info["selection"] = {"protocol": protocol, "criterion": "validation log loss",
                                  "C": chosen, "grid": table, "lbfgs_iterations": iters,
                                  "converged": iters < self.max_iter}
        self.info["validation"] = figures
        refit = bool(self.refit and X_val is not None)
        self.info["trained_on"] = {"rows": len(final_y) if refit or X_val is None else len(y_idx),
                                   "refit_on_train_and_val": refit,
                                   "extra_rows": self._extra_count()}


class MLPHead(Head):
    """One hidden layer (ReLU, dropout), AdamW weight decay, early stopping on val loss.

    Deterministic for a seed: torch's RNG is forked and seeded locally, shuffling uses a
    private generator, and training runs on one thread (CPU kernels of these few ops are
    then reproducible; ``torch.use_deterministic_algorithms`` is not called because it
    imports torch's compiler stack, 4 s here).
    """

    kind = "mlp"
    _in_key = "w1"

    def __init__(self, hidden: int = 512, dropout: float = 0.5, weight_decay: float = 1e-2,
                 lr: float = 1e-3, batch_size: int = 256, max_epochs: int = 100,
                 patience: int = 5, class_weight: str = "auto", seed: int = 0,
                 refit: bool = True, holdout: float = 0.15) -> None:
        super().__init__(class_weight, seed, refit)
        self.hidden = hidden
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.holdout = holdout

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "hidden": self.hidden, "dropout": self.dropout,
                "weight_decay": self.weight_decay, "lr": self.lr,
                "batch_size": self.batch_size, "max_epochs": self.max_epochs,
                "patience": self.patience, "holdout": self.holdout, "optimizer": "AdamW",
                "activation": "relu", "standardise": True}

    @staticmethod
    def _logits(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        h = X @ params["w1"].T + params["b1"]
        np.maximum(h, 0.0, out=h)
        return h @ params["w2"].T + params["b2"]

    def _train(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray,
               X_val: np.ndarray | None, val_idx: np.ndarray | None, epochs: int
               ) -> tuple[dict[str, np.ndarray], int, list[float]]:
        """Train from a seeded init; with validation rows, stop when val loss stops falling.

        Returns (params folded to raw input space, best epoch, val loss per epoch).
        """
        import torch

        mean = X.mean(axis=0, dtype=np.float64)
        std = X.std(axis=0, dtype=np.float64)
        std[std < 1e-8] = 1.0
        n_classes = len(self.classes_)
        # Small data: shrink batches so an epoch still makes several optimizer steps (early
        # stopping counts epochs).
        batch_size = min(self.batch_size, max(16, -(-len(X) // 8)))
        # One thread: these matmuls are small, and on 2 cores with anything else running
        # torch's thread handoffs cost far more than they gain (an epoch of 3,072 × 1280-d
        # rows measured 0.2 s on one thread, 1-2 s on two). It also makes the result
        # independent of the core count.
        threads = torch.get_num_threads()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            torch.set_num_threads(1)
            try:
                net = torch.nn.Sequential(
                    torch.nn.Linear(X.shape[1], self.hidden), torch.nn.ReLU(),
                    torch.nn.Dropout(self.dropout), torch.nn.Linear(self.hidden, n_classes))
                opt = _AdamW(list(net.parameters()), self.lr, self.weight_decay)
                weight = torch.as_tensor(cw, dtype=torch.float32)
                Xt = torch.as_tensor(((X - mean) / std).astype(np.float32))
                yt = torch.as_tensor(y_idx, dtype=torch.long)
                if X_val is not None and val_idx is not None:
                    ok = val_idx >= 0
                    Xv = torch.as_tensor(((X_val[ok] - mean) / std).astype(np.float32))
                    yv = torch.as_tensor(val_idx[ok], dtype=torch.long)
                gen = torch.Generator().manual_seed(self.seed)
                best_loss, best_epoch, best_state = float("inf"), 0, None
                history: list[float] = []
                for epoch in range(1, epochs + 1):
                    net.train()
                    for batch in torch.randperm(len(Xt), generator=gen).split(batch_size):
                        net.zero_grad(set_to_none=True)
                        loss = torch.nn.functional.cross_entropy(net(Xt[batch]), yt[batch],
                                                                 weight=weight)
                        loss.backward()
                        opt.step()
                    if X_val is None:
                        best_epoch = epoch
                        continue
                    net.eval()
                    with torch.no_grad():
                        vloss = float(torch.nn.functional.cross_entropy(net(Xv), yv,
                                                                        weight=weight))
                    history.append(round(vloss, 5))
                    if vloss < best_loss - 1e-5:
                        best_loss, best_epoch = vloss, epoch
                        best_state = {k: v.clone() for k, v in net.state_dict().items()}
                    elif epoch - best_epoch >= self.patience:
                        break
                if best_state is not None:
                    net.load_state_dict(best_state)
            finally:
                torch.set_num_threads(threads)
        sd = {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}
        w1 = sd["0.weight"] / std
        params = {"w1": w1.astype(np.float32),
                  "b1": (sd["0.bias"] - w1 @ mean).astype(np.float32),
                  "w2": sd["3.weight"].astype(np.float32), "b2": sd["3.bias"].astype(np.float32)}
        return params, best_epoch, history

    def _fit(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray, X_val: np.ndarray | None,
             val_idx: np.ndarray | None, val_labels: np.ndarray | None) -> None:
        if X_val is not None and val_idx is not None and val_labels is not None:
            protocol = "validation split"
            tr_X, tr_y = self._with_extra(X, y_idx, None)
            all_X = np.vstack([X, X_val[val_idx >= 0]])
            all_y = np.concatenate([y_idx, val_idx[val_idx >= 0]])
        else:
            mask = stratified_holdout(y_idx, self.holdout, self.seed)
            protocol = f"stratified {self.holdout:.0%} hold-out of the training rows"
            tr_X, tr_y = self._with_extra(X[~mask], y_idx[~mask], np.flatnonzero(~mask))
            X_val, val_idx = X[mask], y_idx[mask]
            val_labels = self.classes_[val_idx]
            all_X, all_y = X, y_idx
        if len(X_val) == 0:
            raise EmbedsearchError("too few examples to hold any out for early stopping",
                                   hint="label at least two images per class")
        params, best_epoch, history = self._train(tr_X, tr_y, cw, X_val, val_idx,
                                                  self.max_epochs)
        figures = self._figures(params, X_val, val_labels)
        if self.refit:
            all_X, all_y = self._with_extra(all_X, all_y, None)
            params, _, _ = self._train(all_X, all_y, cw, None, None, max(best_epoch, 1))
        self.params = params
        self.info["selection"] = {"protocol": protocol, "criterion": "validation loss",
                                  "best_epoch": best_epoch, "epochs_run": len(history),
                                  "val_loss": history}
        self.info["validation"] = figures
        self.info["trained_on"] = {"rows": len(all_y) if self.refit else len(tr_y),
                                   "refit_on_train_and_val": self.refit,
                                   "extra_rows": self._extra_count()}


class _AdamW:
    """AdamW (decoupled weight decay), as ``torch.optim.AdamW`` with default betas/eps.

    Written out because constructing any ``torch.optim`` optimizer imports torch's
    compiler stack (torch._dynamo, about 4 s on 2 cores): longer than training a head.
    """

    def __init__(self, params: list[Any], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        import torch

        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self) -> None:
        import torch

        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        with torch.no_grad():
            for p, m, v in zip(self.params, self.m, self.v, strict=True):
                if p.grad is None:
                    continue
                p.mul_(1 - self.lr * self.wd)
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


HEAD_CLASSES: dict[str, type[Head]] = {"linear": LinearHead, "mlp": MLPHead}


def make_head(kind: str, **params: Any) -> Head:
    """A new, unfitted head of ``kind`` ("linear" or "mlp")."""
    if kind not in HEAD_CLASSES:
        raise EmbedsearchError(f"unknown head {kind!r}", hint=f"use one of {HEAD_KINDS}")
    return HEAD_CLASSES[kind](**params)


def read_head_meta(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / HEAD_FILE
    if not path.is_file():
        raise BundleError(f"{folder} holds no {HEAD_FILE}: not a trained head",
                          hint="train one: embedsearch train --index NAME --head linear")
    meta = read_versioned_json(path, HEAD_FORMAT, HEAD_SCHEMA, "head description",
                               "retrain the head with embedsearch train")
    if meta.get("kind") not in HEAD_CLASSES:
        raise BundleError(f"{path}: unknown head kind {meta.get('kind')!r}")
    return meta


def load_head(folder: str | Path) -> Head:
    """Load a saved head (no pickle: safetensors + JSON), checking its weights' sha256."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    meta = read_head_meta(folder)
    wpath = folder / meta["weights"]["file"]
    if not wpath.is_file() or file_digest(wpath) != meta["weights"]["sha256"]:
        raise BundleError(f"{wpath} is missing or was modified after the head was saved",
                          hint=f"retrain it: embedsearch train … --head {meta['kind']}")
    try:
        params = {k: np.asarray(v, np.float32) for k, v in load_file(str(wpath)).items()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise BundleError(f"{wpath}: unreadable safetensors ({exc})") from exc
    expected = {k: tuple(v) for k, v in meta["weights"]["tensors"].items()}
    if {k: v.shape for k, v in params.items()} != expected:
        raise BundleError(f"{wpath} holds tensors that do not match {folder / HEAD_FILE}")
    hp = dict(meta["hyperparameters"])
    cls = HEAD_CLASSES[meta["kind"]]
    head = cls.__new__(cls)
    Head.__init__(head, hp.pop("class_weight"), hp.pop("seed"), hp.pop("refit"))
    for key, value in hp.items():
        setattr(head, key, value)
    if isinstance(head, LinearHead):
        head.grid = tuple(head.grid)
    head.classes_ = np.asarray(meta["classes"], dtype=str)
    head.params = params
    skip = {"format", "schema_version", "kind", "embedsearch_version", "classes", "dim",
            "hyperparameters", "weights"}
    head.info = {k: v for k, v in meta.items() if k not in skip}
    if head.dim != meta["dim"] or len(head.classes_) != params[_out_key(head)].shape[0]:
        raise BundleError(f"{folder / HEAD_FILE} disagrees with its weights (dim or classes)")
    return head


def _out_key(head: Head) -> str:
    return "coef" if isinstance(head, LinearHead) else "b2"
