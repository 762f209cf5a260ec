"""The MLP head: one hidden layer beside a linear skip path, trained with torch on CPU."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from embedsearch.classify import DEFAULT_SELECT_BY
from embedsearch.classify.base import Head, Standardiser

#: MLP schedule length when ``max_epochs`` is None: about this many optimizer steps...
MLP_STEPS = 600
#: ... within these epoch bounds.
MLP_EPOCHS = (15, 40)
#: An MLP whose best epoch is its schedule's last is retrained on a schedule twice as long
#: when rows x epochs stays under this (larger sets: flagged only, to bound the time).
MLP_EXTEND_ROW_EPOCHS = 250_000


class MLPHead(Head):
    """One hidden layer (ReLU, dropout) beside a linear skip path (``skip``: logits =
    linear(x) + W2 relu(W1 x)), AdamW with weight decay, label smoothing and a cosine
    learning-rate schedule; the epoch is chosen in the schedule's second half. The skip path
    lets the network be at least the linear model it contains.

    Why: with a constant learning rate and early stopping on validation loss, the loss of
    an over-confident network rises after an epoch or two on noisy collections and the
    choice collapsed to 1 epoch (accuracy 5-9 points under the linear head on 16k
    posters). A decaying schedule, label smoothing and choosing by the selection metric
    among annealed epochs keep the choice stable.

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
                 max_epochs: int | None = None, skip: bool = True,
                 class_weight: str = "auto", select_by: str = DEFAULT_SELECT_BY, seed: int = 0,
                 refit: bool = True, holdout: float = 0.15) -> None:
        self.hidden = hidden
        self.skip = skip
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.label_smoothing = label_smoothing
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.class_weight = class_weight
        self.select_by = select_by
        self.seed = seed
        self.refit = refit
        self.holdout = holdout

    @staticmethod
    def _logits(params: dict[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        h = X @ params["w1"].T + params["b1"]
        np.maximum(h, 0.0, out=h)
        out = h @ params["w2"].T + params["b2"]
        if "w0" in params:  # the linear skip path
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
               stop: int, X_eval: np.ndarray | None = None
               ) -> tuple[Standardiser, dict[str, np.ndarray], list[np.ndarray]]:
        """Train on a cosine schedule of ``epochs`` epochs, stopping after ``stop``.

        Returns the standardiser, the state (standardised space) and, with ``X_eval``, its
        logits after every epoch.
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
                body = torch.nn.Sequential(
                    torch.nn.Linear(X.shape[1], self.hidden), torch.nn.ReLU(),
                    torch.nn.Dropout(self.dropout), torch.nn.Linear(self.hidden, n_classes))
                skip = torch.nn.Linear(X.shape[1], n_classes, bias=False) if self.skip \
                    else None

                def net(x: Any) -> Any:
                    return body(x) + skip(x) if skip is not None else body(x)

                params = list(body.parameters()) + (list(skip.parameters()) if skip else [])
                opt = _AdamW(params, self.lr, self.weight_decay)
                weight = torch.as_tensor(cw, dtype=torch.float32)
                Xt = torch.as_tensor(st(X))
                yt = torch.as_tensor(y_idx, dtype=torch.long)
                Xe = torch.as_tensor(st(X_eval)) if X_eval is not None else None
                gen = torch.Generator().manual_seed(self.seed)
                total = epochs * -(-len(Xt) // batch_size)
                step = 0
                for _ in range(stop):
                    body.train()
                    for batch in torch.randperm(len(Xt), generator=gen).split(batch_size):
                        opt.lr = self.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                        step += 1
                        for p in params:
                            p.grad = None
                        loss = torch.nn.functional.cross_entropy(
                            net(Xt[batch]), yt[batch], weight=weight,
                            label_smoothing=self.label_smoothing)
                        loss.backward()
                        opt.step()
                    if Xe is not None:
                        body.eval()
                        with torch.no_grad():
                            evals.append(net(Xe).numpy().astype(np.float64))
            finally:
                torch.set_num_threads(threads)
        sd = {k: v.detach().numpy().astype(np.float64) for k, v in body.state_dict().items()}
        if skip is not None:
            sd["skip"] = skip.weight.detach().numpy().astype(np.float64)
        return st, sd, evals

    def _search(self, held: list[tuple[np.ndarray, np.ndarray, np.ndarray]], cw: np.ndarray
                ) -> tuple[list[dict[str, Any]], list[np.ndarray], list[str]]:
        notes: list[str] = []
        epochs = self._epochs(len(held[0][1]))
        while True:
            per_fold = [self._train(Xf, yf, cw, epochs, epochs, Xh)[2] for Xf, yf, Xh in held]
            first = epochs // 2 + 1  # the annealed half of the schedule
            settings = [{"epochs": epochs, "best_epoch": e} for e in range(first, epochs + 1)]
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
            return settings, pooled, notes


    def _final(self, X: np.ndarray, y_idx: np.ndarray, cw: np.ndarray,
               setting: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        st, sd, _ = self._train(X, y_idx, cw, setting["epochs"], setting["best_epoch"])
        w1, b1 = st.fold(sd["0.weight"], sd["0.bias"])
        params = {"w1": w1, "b1": b1, "w2": sd["3.weight"].astype(np.float32),
                  "b2": sd["3.bias"].astype(np.float32)}
        if "skip" in sd:
            w0, b0 = st.fold(sd["skip"], np.zeros(len(self.classes_)))
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
