"""Train / validation / test assignment for a benchmark, duplicate-group aware.

Rules:

* The collection's own ``train``/``val``/``test`` folders (or split column) are used when
  it has a test split; a missing validation split is carved from train.
* Otherwise a stratified split with a fixed seed (70/15/15 by default), or k-fold
  cross-validation when asked for.
* Images in one duplicate group never straddle splits. In an own split whole groups are
  assigned together. With the collection's own splits, the test set is left as published
  and the leaking copies are taken out of train/val (a group spanning train and val is
  moved to train), and both counts are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedsearch.errors import EmbedsearchError

ROLES = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)


@dataclass
class Fold:
    """Row indices (into the study's table) of each role."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


@dataclass
class SplitPlan:
    """The folds to evaluate (one unless cross-validating) and what was done to get them."""

    folds: list[Fold]
    protocol: str
    duplicates: dict[str, Any] = field(default_factory=dict)
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    notes: list[str] = field(default_factory=list)

    def describe(self, labels: np.ndarray) -> dict[str, Any]:
        folds = []
        for f in self.folds:
            folds.append({
                **f.counts(),
                "by_class": {role: _count(labels[getattr(f, role)]) for role in ROLES},
            })
        return {"protocol": self.protocol, "folds": folds, "excluded_rows": len(self.excluded),
                "notes": self.notes}


def _count(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels.astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts, strict=True)}


def connected_groups(n: int, pairs: Sequence[tuple[int, int]] | np.ndarray) -> np.ndarray:
    """Group id per row from duplicate pairs (connected components); singletons get their
    own id.

    Ids are the smallest row index of each group, so they do not depend on pair order.
    """
    from embedsearch.dedupe.calibrate import components

    edges = np.asarray(pairs, np.int64).reshape(-1, 2)
    component = components(n, edges[:, 0], edges[:, 1])
    first = np.full(component.max() + 1 if n else 0, n, np.int64)
    np.minimum.at(first, component, np.arange(n))
    return first[component]


def group_split(labels: np.ndarray, groups: np.ndarray, rows: np.ndarray,
                fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split ``rows`` into len(fractions) parts, stratified by label, whole groups at once.

    Per class (a group's class is the label of its first row), groups are shuffled with
    the seed and dealt to the part whose share is furthest below its target, so each part
    gets about its fraction of each class; a class with fewer groups than parts fills the
    first part (train) first, then the last (test).

    Hand-written because scikit-learn's splitters cannot do this: ``StratifiedGroupKFold``
    makes parts of 1/k only (70/15/15 becomes 71/14/14) and does not see to it that each
    part holds every class. Measured: 45 images in 6 classes of 4-12 groups, 200 seeds,
    test = one of 7 folds and validation one of 6 folds of the rest: a part lacked a class
    for 183 seeds; with this deal, for none (benchmarks/results/library_swaps.md).
    (Cross-validation folds are scikit-learn's
    ``StratifiedGroupKFold``, see :func:`_cv_folds`.)
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    frac = np.asarray(fractions, np.float64) / np.sum(fractions)
    rows = np.asarray(rows, np.int64)
    by_group: dict[int, list[int]] = {}
    for r in rows:
        by_group.setdefault(int(groups[r]), []).append(int(r))
    by_class: dict[str, list[int]] = {}
    for g, members in sorted(by_group.items()):
        by_class.setdefault(str(labels[members[0]]), []).append(g)
    # One group per part first (train, then test, then validation) as far as the class
    # has groups, then each group to the part furthest below its target.
    first = [p for p in (0, len(frac) - 1, *range(1, len(frac) - 1)) if frac[p] > 0]
    for cls in sorted(by_class):
        gids = by_class[cls]
        gids = [gids[i] for i in rng.permutation(len(gids))]
        total = sum(len(by_group[g]) for g in gids)
        have = np.zeros(len(frac))
        for n_dealt, g in enumerate(gids):
            target = first[n_dealt] if n_dealt < len(first) \
                else int(np.argmax(frac * total - have))
            parts[target].extend(by_group[g])
            have[target] += len(by_group[g])
    return [np.array(sorted(p), np.int64) for p in parts]


def plan_splits(labels: np.ndarray, given: np.ndarray, groups: np.ndarray, *, seed: int,
                cv_folds: int | None = None,
                fractions: Sequence[float] = DEFAULT_FRACTIONS) -> SplitPlan:
    """Decide the folds; ``given`` holds each row's split from the collection (or "")."""
    n = len(labels)
    rows = np.arange(n)
    notes: list[str] = []
    dup = _group_stats(groups)
    if cv_folds:
        if cv_folds < 2:
            raise EmbedsearchError(f"cross-validation needs at least 2 folds, got {cv_folds}")
        folds = _cv_folds(labels, groups, rows, cv_folds, seed, fractions)
        protocol = (f"{cv_folds}-fold stratified cross-validation (duplicate groups kept "
                    "within one fold); every image is a test image once; validation carved "
                    f"from each fold's training part ({fractions[1] / sum(fractions[:2]):.0%})")
        if np.any(given != ""):
            notes.append("the collection's own split folders were pooled for "
                          "cross-validation")
        dup.update({"straddling_groups": 0, "handling": "each group kept within one fold"})
        return SplitPlan(folds, protocol, dup, notes=notes)
    has = {r: bool(np.any(given == r)) for r in ROLES}
    if has["test"] and (has["train"] or has["val"] or np.any(given == "")):
        role = np.where(np.isin(given, ROLES), given, "train").astype(object)
        if np.any(~np.isin(given, ROLES)):
            notes.append(f"{int(np.sum(~np.isin(given, ROLES)))} rows without a split "
                         "were used for training")
        role, handled = _resolve_straddling(role, groups)
        dup.update(handled)
        excluded = np.flatnonzero(role == "")
        if not np.any(role == "val"):
            train = np.flatnonzero(role == "train")
            tv = fractions[0] + fractions[1]
            tr, va = group_split(labels, groups, train, (fractions[0] / tv, fractions[1] / tv),
                                 seed)
            role[va] = "val"
            notes.append(f"the collection has no validation split: {len(va)} training images "
                         "(stratified, seed "
                         f"{seed}) were held out for validation")
        fold = Fold(*(np.flatnonzero(role == r) for r in ROLES))
        protocol = "the collection's own train / validation / test split"
        return SplitPlan([fold], protocol, dup, excluded=excluded, notes=notes)
    if has["train"] or has["val"]:
        notes.append("the collection has no test split, so all of it was split afresh")
    tr, va, te = group_split(labels, groups, rows, fractions, seed)
    protocol = (f"stratified {'/'.join(f'{100 * f / sum(fractions):.0f}' for f in fractions)}"
                f" train/validation/test split, seed {seed}, duplicate groups kept together")
    dup.update({"straddling_groups": 0, "handling": "each group assigned to one split"})
    return SplitPlan([Fold(tr, va, te)], protocol, dup, notes=notes)


def _group_stats(groups: np.ndarray) -> dict[str, Any]:
    _, sizes = np.unique(groups, return_counts=True)
    multi = sizes[sizes > 1]
    return {"groups": len(multi), "images_in_groups": int(multi.sum()),
            "redundant_images": int((multi - 1).sum()), "largest_group": int(multi.max())
            if len(multi) else 0}


def _resolve_straddling(role: np.ndarray, groups: np.ndarray
                        ) -> tuple[np.ndarray, dict[str, Any]]:
    """Make every duplicate group sit in one split without touching the test set."""
    role = role.copy()
    straddling = removed = moved = 0
    order = np.argsort(groups, kind="stable")
    g_sorted = groups[order]
    starts = np.flatnonzero(np.r_[True, g_sorted[1:] != g_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    for s, e in zip(starts, ends, strict=True):
        if e - s < 2:
            continue
        members = order[s:e]
        roles = set(role[members])
        if len(roles) < 2:
            continue
        straddling += 1
        if "test" in roles:
            leak = members[role[members] != "test"]
            role[leak] = ""
            removed += len(leak)
        else:  # train + val
            leak = members[role[members] == "val"]
            role[leak] = "train"
            moved += len(leak)
    return role, {
        "straddling_groups": straddling,
        "removed_from_train_val": removed,
        "moved_val_to_train": moved,
        "handling": ("test split kept as published; copies in train/val of a test image "
                     "removed; groups spanning train and val moved to train"),
    }


def _cv_folds(labels: np.ndarray, groups: np.ndarray, rows: np.ndarray, k: int, seed: int,
              fractions: Sequence[float]) -> list[Fold]:
    from sklearn.model_selection import StratifiedGroupKFold

    counts = np.unique(labels, return_counts=True)[1]
    if len(rows) < k:
        raise EmbedsearchError(f"{len(rows)} labelled images cannot make {k} folds")
    if counts.max() < k:
        raise EmbedsearchError(f"no class has {k} images, so {k}-fold cross-validation is "
                               "not possible", hint="use fewer folds")
    skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    tv = fractions[0] + fractions[1]
    folds = []
    import warnings

    with warnings.catch_warnings():
        # "The least populated class has only N members": expected for small classes.
        warnings.simplefilter("ignore", UserWarning)
        splits = list(skf.split(rows, labels, groups))
    for i, (train_val, test) in enumerate(splits):
        tr, va = group_split(labels, groups, rows[train_val],
                             (fractions[0] / tv, fractions[1] / tv), seed + 1 + i)
        folds.append(Fold(tr, va, np.sort(rows[test])))
    return folds
