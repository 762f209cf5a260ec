"""The MLP head: a hidden layer learning a residual over the linear head, torch on CPU."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from embedsearch.classify import DEFAULT_SELECT_BY
from embedsearch.classify.base import Head, Standardiser, _score
from embedsearch.classify.linear import LinearHead

#: MLP schedule length when ``max_epochs`` is None: about this many optimizer steps...
MLP_STEPS = 600
#: ... within these epoch bounds.
MLP_EPOCHS = (10, 40)
#: An MLP whose best epoch is its schedule's last is retrained on a schedule twice as long
#: when rows x epochs stays under this (larger sets: flagged only, to bound the time).
MLP_EXTEND_ROW_EPOCHS = 250_000
#: The hidden layer is kept only when its gain over the linear base on the held-out rows
#: is significant: a paired bootstrap's share of resamples where it is not better must be
#: below this (one-sided 5 %); otherwise the head is its linear base (epoch 0).
MLP_GAIN_P = 0.05
#: Paired bootstrap resamples for that test.
MLP_GAIN_RESAMPLES = 1000

Offsets = tuple[np.ndarray, np.ndarray] | None


class MLPHead(Head):
    """One hidden layer (ReLU, dropout), AdamW with weight decay, label smoothing and a
    cosine learning-rate schedule, on top of the linear head (``base="linear"``): logits =
    linear(x) + W2 relu(W1 x), the linear part fitted and chosen first (as ``LinearHead``)
    and then frozen, the hidden layer's output starting at zero. Candidates are epoch 0
    (exactly the linear head) and the epochs of the schedule's annealed second half, so
    on validation the MLP is never below its linear head, and says so when it is no better
    (``best_epoch`` 0). ``base="none"`` trains the hidden layer alone.

    Selection follows the linear head's protocol exactly (the same validation rows, the
    same stratified k folds below ``HOLDOUT_MIN_ROWS`` rows, the same hold-out above), so
    the base is the very setting ``LinearHead`` chooses; the hidden layer's epoch is then
    scored on those same out-of-fold rows, and kept only when its gain over the base is
    significant (paired bootstrap, ``MLP_GAIN_P``): a gain within the noise of a few
    hundred held-out rows is the maximum of ~20 noisy epoch scores, not a better model.
    Otherwise the head is its linear base and ``info["selection"]["notes"]`` says why.

    Why: with a constant learning rate and early stopping on validation loss, the loss of
    an over-confident network rises after an epoch or two on noisy collections and the
    choice collapsed to 1 epoch (accuracy 5-9 points under the linear head on 16k
    posters); a plain MLP with a cosine schedule still trailed the linear head by 1-3
    points on clothing-small and its imbalanced subsets (benchmarks/results/
    heads_selection.md).

    Deterministic for a seed: torch's RNG is forked and seeded locally, shuffling uses a
    private generator, and training runs on one thread (CPU kernels of these few ops are
    then reproducible; ``torch.use_deterministic_algorithms`` is not called because it
    imports torch's compiler stack, 4 s here).
    """

    kind = "mlp"
    _in_key = "w1"
    _out_key = "b2"
    _bias_key = "b2"

    def __init__(self, hidden: int = 512, dropout: float = 0.5, weight_decay: float = 0.05,
                 lr: float = 1e-3, label_smoothing: float = 0.1, batch_size: int = 256,
                 max_epochs: int | None = None, base: str = "linear",
                 class_weight: str = "auto", select_by: str = DEFAULT_SELECT_BY, seed: int = 0,
                 refit: bool = True, holdout: float = 0.15, cv_folds: int = 5) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.label_smoothing = label_smoothing
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.base = base
        self.class_weight = class_weight
        self.select_by = select_by
        self.seed = seed
        self.refit = refit
        self.holdout = holdout
        self.cv_folds = cv_folds

    def _cv_folds(self) -> int:
        return self.cv_folds

    @staticmethod
    def _logits(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        h = X @ params["w1"].T + params["b1"]
        np.maximum(h, 0.0, out=h)
        out = h @ params["w2"].T + params["b2"]
        if "w0" in params:  # the linear base
            out += X @ params["w0"].T
        return out

    def _batch(self, n: int) -> int:
        # Small data: shrink batches so an epoch still makes several optimizer steps.
        return min(self.batch_size, max(16, -(-n // 8)))

    def _epochs(self, n: int) -> int:
        if self.max_epochs is not None:
            return int(self.max_epochs)
        steps = -(-n // self._batch(n))
        return int(np.clip(math.ceil(MLP_STEPS / steps), *MLP_EPOCHS))

    def _train(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray, epochs: int,
               stop: int, X_eval: np.ndarray | None = None, offsets: Offsets = None
               ) -> tuple[Standardiser, dict[str, np.ndarray], list[np.ndarray]]:
        """Train on a cosine schedule of ``epochs`` epochs, stopping after ``stop``.

        ``offsets`` = (logits of ``X``, logits of ``X_eval``) of the frozen base, added to
        the hidden layer's output. Returns the standardiser, the state (standardised space)
        and, with ``X_eval``, the logits after every epoch.
        """
        import torch

        st = Standardiser(X)
        n_classes = len(self.classes_)
        batch_size = self._batch(len(X))
        # One thread: these matmuls are small, and on 2 cores with anything else running
        # torch's thread handoffs cost far more than they gain (an epoch of 3,072 x 1280-d
        # rows measured 0.2 s on one thread, 1-2 s on two). It also makes the result
        # independent of the core count.
        threads = torch.get_num_threads()
        evals: list[np.ndarray] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            torch.set_num_threads(1)
            try:
                net = torch.nn.Sequential(
                    torch.nn.Linear(X.shape[1], self.hidden), torch.nn.ReLU(),
                    torch.nn.Dropout(self.dropout), torch.nn.Linear(self.hidden, n_classes))
                base_tr = base_ev = None
                if offsets is not None:
                    # A residual starts at zero: epoch 0 is exactly the base. A class absent
                    # from a fold's rows has -inf base logits: kept finite (label smoothing).
                    torch.nn.init.zeros_(net[3].weight)
                    torch.nn.init.zeros_(net[3].bias)
                    base_tr, base_ev = (torch.as_tensor(np.maximum(o, -30.0), dtype=torch.float32)
                                        for o in offsets)
                opt = _AdamW(list(net.parameters()), self.lr, self.weight_decay)
                weight = torch.as_tensor(cw, dtype=torch.float32)
                Xt = torch.as_tensor(st(X))
                yt = torch.as_tensor(y_idx, dtype=torch.long)
                Xe = torch.as_tensor(st(X_eval)) if X_eval is not None else None
                gen = torch.Generator().manual_seed(self.seed)
                total = epochs * -(-len(Xt) // batch_size)
                step = 0
                for _ in range(stop):
                    net.train()
                    for batch in torch.randperm(len(Xt), generator=gen).split(batch_size):
                        opt.lr = self.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                        step += 1
                        net.zero_grad(set_to_none=True)
                        out = net(Xt[batch])
                        if base_tr is not None:
                            out = out + base_tr[batch]
                        loss = torch.nn.functional.cross_entropy(
                            out, yt[batch], weight=weight, label_smoothing=self.label_smoothing)
                        loss.backward()
                        opt.step()
                    if Xe is not None:
                        net.eval()
                        with torch.no_grad():
                            out = net(Xe) if base_ev is None else net(Xe) + base_ev
                            evals.append(out.numpy().astype(np.float64))
            finally:
                torch.set_num_threads(threads)
        sd = {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}
        return st, sd, evals

    def _linear(self) -> LinearHead:
        """The base, sharing this head's classes, prior and held-out truth."""
        lin = LinearHead(class_weight=self.class_weight, select_by=self.select_by,
                         seed=self.seed, holdout=self.holdout, cv_folds=self.cv_folds)
        lin.classes_, lin._log_prior = self.classes_, self._log_prior
        lin._taus, lin._held_truth = self._taus, self._held_truth
        return lin

    def _search(self, held: list[tuple[np.ndarray, np.ndarray, np.ndarray]], cw: np.ndarray
                ) -> tuple[list[dict[str, Any]], list[np.ndarray], list[str]]:
        notes: list[str] = []
        base: dict[str, Any] = {}
        offsets: list[Offsets] = [None] * len(held)
        if self.base == "linear":
            self._base = lin = self._linear()
            cs, logits, lin_notes = lin._search(held, cw)
            i = max(range(len(cs)), key=lambda j: self._best_score(logits[j]))
            base = cs[i]
            notes += lin_notes
            offsets = [(st(Xf) @ W.T + b, st(Xh) @ W.T + b)
                       for (Xf, _, Xh), (st, W, b) in zip(held, lin._fitted[base["C"]],
                                                          strict=True)]
        epochs = self._epochs(len(held[0][1]))
        while True:
            per_fold = [self._train(Xf, yf, cw, epochs, epochs, Xh, off)[2]
                        for (Xf, yf, Xh), off in zip(held, offsets, strict=True)]
            first = epochs // 2 + 1  # the annealed half of the schedule
            settings = [{**base, "epochs": epochs, "best_epoch": e}
                        for e in range(first, epochs + 1)]
            pooled = [np.vstack([f[e - 1] for f in per_fold]) for e in range(first, epochs + 1)]
            scores = [self._best_score(p) for p in pooled]
            at_end = max(range(len(scores)), key=scores.__getitem__) == len(scores) - 1
            rows = len(held[0][1]) * len(held)
            if at_end and self.max_epochs is None and rows * epochs * 2 <= MLP_EXTEND_ROW_EPOCHS:
                notes.append(f"best at the last of {epochs} epochs: schedule extended to "
                             f"{2 * epochs}")
                epochs *= 2
                continue
            if at_end:
                notes.append(f"best at the last of {epochs} epochs; not extended "
                             + ("(--max-epochs fixed it)" if self.max_epochs is not None else
                                "(time): --max-epochs sets a longer schedule"))
            if base:  # epoch 0: the linear head alone (listed first: it wins ties)
                settings.insert(0, {**base, "epochs": epochs, "best_epoch": 0})
                pooled.insert(0, np.vstack([o[1] for o in offsets if o is not None]))
                note = self._insignificant(settings, pooled, len(held))
                if note:
                    notes.append(note)
                    return settings[:1], pooled[:1], notes
            return settings, pooled, notes

    def _insignificant(self, settings: list[dict[str, Any]], pooled: list[np.ndarray],
                       folds: int) -> str | None:
        """Why the best epoch's gain over epoch 0 (``pooled[0]``, the linear base) is not
        significant, or None when it is (or no epoch beats the base at all)."""
        from embedsearch.report.metrics import paired_difference, resampled_metrics

        scores = [self._best_score(p) for p in pooled]
        best = max(range(len(scores)), key=scores.__getitem__)
        if best == 0:
            return None
        k = len(self.classes_)
        # A held-out class unknown to training (-1) is its own label, never predicted.
        truth = np.where(self._held_truth >= 0, self._held_truth, k)
        samples, points = [], []
        for i in (best, 0):
            fits = [_score(pooled[i] - t * self._log_prior, self._held_truth, self.classes_,
                           self.select_by) for t in self._taus]
            tau = self._taus[max(range(len(fits)), key=lambda j, f=fits: (f[j][0], -f[j][1]))]
            pred = (pooled[i] - tau * self._log_prior).argmax(1)
            samples.append(resampled_metrics(truth, pred, k + 1, self.seed,
                                             MLP_GAIN_RESAMPLES)[self.select_by])
            points.append(scores[i][0])
        diff = paired_difference(samples[0], samples[1], points[0], points[1])
        if diff["p_not_better"] < MLP_GAIN_P:
            return None
        where = f"{folds}-fold cross-validation" if folds > 1 else "the held-out rows"
        return (f"hidden layer not kept: its best epoch ({settings[best]['best_epoch']}) "
                f"gained {diff['difference']:+.4f} {self.select_by} over the linear base on "
                f"{where}, not significant (paired bootstrap p={diff['p_not_better']:.2f}, "
                f"needs < {MLP_GAIN_P}): the head is its linear base (epoch 0)")

    def _final(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray,
               setting: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        offsets: Offsets = None
        if "C" in setting:
            st0, W, b, _ = self._base.fit_at(X, y_idx, cw, setting["C"])
            offsets = (st0(X) @ W.T + b, np.zeros((0, len(self.classes_))))
        st, sd, _ = self._train(X, y_idx, cw, setting["epochs"], setting["best_epoch"],
                                None, offsets)
        w1, b1 = st.fold(sd["0.weight"], sd["0.bias"])
        params = {"w1": w1, "b1": b1, "w2": sd["3.weight"].astype(np.float32),
                  "b2": sd["3.bias"].astype(np.float32)}
        if offsets is not None:
            w0, b0 = st0.fold(W, b)
            params["w0"], params["b2"] = w0, (params["b2"] + b0).astype(np.float32)
        return params, {}


class _AdamW:
    """AdamW (decoupled weight decay), as ``torch.optim.AdamW`` with default betas/eps.

    Written out because constructing any ``torch.optim`` optimizer imports torch's
    compiler stack (torch._dynamo, about 4 s on 2 cores): longer than training a head.
    ``lr`` may change between steps (the schedule sets it).
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
