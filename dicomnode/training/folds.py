"""Stratified, patient-grouped k-fold splits.

A patient (group) is never in two folds, and each fold keeps roughly the
class proportions of the whole set (:class:`sklearn.model_selection.StratifiedGroupKFold`,
shuffled with the run's seed, so the same seed always gives the same folds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
from sklearn.model_selection import StratifiedGroupKFold

from dicomnode.errors import ConfigError

IntArray = npt.NDArray[np.int64]


def assign_folds(labels: IntArray, groups: Sequence[str], folds: int, seed: int) -> IntArray:
    """The fold (0..folds-1) of every sample."""
    if len(set(groups)) < folds:
        raise ConfigError(f"{len(set(groups))} patients cannot make {folds} folds")
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    assignment = np.full(len(labels), -1, dtype=np.int64)
    dummy = np.zeros((len(labels), 1))
    for fold, (_, held_out) in enumerate(splitter.split(dummy, labels, groups=list(groups))):
        assignment[held_out] = fold
    return assignment


def joined_groups(groups: Sequence[str], pairs: Iterable[tuple[int, int]]) -> tuple[str, ...]:
    """``groups`` with the groups of each pair of files joined into one, named after the
    group that comes first among them (files that hold one image become one patient to the
    split); a group joined to no other keeps its name, so a folder without pairs keeps its
    split."""
    first: dict[str, int] = {}
    for index, group in enumerate(groups):
        first.setdefault(group, index)
    parent = {group: group for group in first}

    def root(group: str) -> str:
        while parent[group] != group:
            parent[group] = parent[parent[group]]
            group = parent[group]
        return group

    for one, other in pairs:
        ends = sorted({root(groups[one]), root(groups[other])}, key=first.__getitem__)
        for later in ends[1:]:
            parent[later] = ends[0]
    return tuple(root(group) for group in groups)


def split(assignment: IntArray, fold: int) -> tuple[IntArray, IntArray]:
    """(training indices, validation indices) when ``fold`` is held out."""
    train: IntArray = np.flatnonzero(assignment != fold).astype(np.int64)
    valid: IntArray = np.flatnonzero(assignment == fold).astype(np.int64)
    return train, valid
