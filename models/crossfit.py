"""Heads cross-fitted on a training split's features, merged into the bundle's one head.

Each of k heads trains on all folds but its own and stops early on its own fold, so the
whole split trains the bundle, and every training painting is also scored by a head that
never saw it: those out-of-fold logits calibrate the bundle's temperature and score any
choice of flags over the whole split rather than over one small fold.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import keras
import numpy as np

from models.bundle import HeadSpec
from models.head import (
    HeadConfig,
    Rows,
    calibrated_probabilities,
    fit_head,
    fit_temperature,
    low_rank_head,
    merge_heads,
    predict_logits,
    stratified_folds,
)
from models.metrics import Scoreboard, SplitScores
from models.settings import VoteConfig
from models.vote import TrainingVote

NO_VOTE = VoteConfig(voters=0)


@dataclass(frozen=True)
class LabelledSet:
    features: np.ndarray  # (images, width), float16 as stored, or float32
    mirrored: np.ndarray | None  # the features of each image's mirror, when training on them
    labels: np.ndarray  # class indices
    names: np.ndarray  # label names, unknown ones included


@dataclass(frozen=True)
class TrainingData:
    classes: list[str]
    train: LabelledSet
    evaluation: LabelledSet | None
    counts: dict[str, int]


@dataclass(frozen=True)
class HeadFit:
    """What the manifest records of a fit beside the merged head: its spec, the classes, the
    counts and the scores, by split (`out_of_fold`, and the held-out split's name)."""

    head: HeadSpec
    classes: tuple[str, ...]
    counts: dict[str, int]
    scores: dict[str, SplitScores]
    vote: TrainingVote | None = None  # the training paintings' vote, where there is one


def fit_bundle_head(
    data: TrainingData,
    config: HeadConfig,
    folds: int,
    eval_split: str,
    vote_config: VoteConfig = NO_VOTE,
) -> tuple[keras.Model, HeadFit]:
    """Cross-fits one head per fold of the training split and merges them into one.

    Head k trains on every fold but k and stops early where fold k stops improving, so all
    of the split trains the bundle and every training painting is also scored once by a
    head that never saw it. Those out-of-fold logits calibrate the temperature and give
    the choices of flags a score over the whole split, not over a small fold.
    With `vote_config.voters`, the training paintings' vote is mixed in, and the scores
    are the mixture's. Returns the merged head with everything the manifest records
    (`eval_split` names the held-out split's scores).
    """
    classes, train, held_out = data.classes, data.train, data.evaluation
    fold_of = stratified_folds(train.labels, folds, config.seed)
    heads, epochs, out_of_fold = cross_fit_heads(train, fold_of, len(classes), config)
    head = merge_heads(heads)
    if config.projection:
        head = low_rank_head(head, _sample(train.features, config.seed), config.projection)
    temperature = fit_temperature(out_of_fold, train.labels)
    out_of_fold_probabilities = _calibrated(out_of_fold, temperature)
    vote = None
    if vote_config.voters:
        vote = TrainingVote.fitted(
            train.features, train.labels, len(classes), vote_config, config.seed
        )
        left_out = vote.left_out_votes()
        vote = vote.calibrated(out_of_fold_probabilities, left_out, train.labels)
        out_of_fold_probabilities = _numpy(vote.mixture(out_of_fold_probabilities, left_out))
    scores = {"out_of_fold": _score(out_of_fold_probabilities, train.names, classes)}
    if held_out is not None:
        probabilities = _calibrated(predict_logits(head, held_out.features), temperature)
        if vote is not None:
            probabilities = _numpy(vote.mixture(probabilities, vote.votes(held_out.features)))
        scores[eval_split] = _score(probabilities, held_out.names, classes)
    fit = HeadFit(
        head=HeadSpec(
            temperature=temperature,
            fit={
                "folds": folds,
                **config.as_dict(),
                "epochs_trained": epochs,  # each head's, where its fold stopped improving
            },
        ),
        classes=tuple(classes),
        counts={
            **data.counts,
            "train": len(train.labels),
            "train_mirrored": 0 if train.mirrored is None else len(train.labels),
            "eval": 0 if held_out is None else len(held_out.labels),
        },
        scores=scores,
        vote=vote,
    )
    return head, fit


def cross_fit_heads(
    train: LabelledSet, folds: np.ndarray, n_classes: int, config: HeadConfig
) -> tuple[list[keras.Model], list[int], np.ndarray]:
    """One head per fold, trained on the other folds (and their mirrors) and stopped early
    on its own; returns the heads, their epochs and every painting's out-of-fold logits."""
    out_of_fold = np.zeros((len(train.labels), n_classes), dtype=np.float32)
    views = (train.features,) if train.mirrored is None else (train.features, train.mirrored)
    heads, epochs = [], []
    for k in range(folds.max() + 1):
        held = np.flatnonzero(folds == k)
        trained = np.flatnonzero(folds != k)
        fold_rows = Rows.of((train.features,), held, train.labels[held])
        head, head_epochs = fit_head(
            Rows.of(views, trained, train.labels[trained]),
            fold_rows,
            n_classes,
            replace(config, seed=config.seed + k),
        )
        out_of_fold[held] = predict_logits(head, fold_rows)
        heads.append(head)
        epochs.append(head_epochs)
    return heads, epochs, out_of_fold


PROJECTION_SAMPLE = 20_000  # training paintings whose pre-activations fit the projection


def _sample(features: np.ndarray, seed: int) -> np.ndarray:
    """Up to PROJECTION_SAMPLE rows, drawn without replacement: the projection's directions
    settle long before every painting is read."""
    if len(features) <= PROJECTION_SAMPLE:
        return features
    rows = np.random.default_rng(seed).choice(len(features), PROJECTION_SAMPLE, replace=False)
    return features[np.sort(rows)]


def _calibrated(logits: np.ndarray, temperature: float) -> np.ndarray:
    return _numpy(calibrated_probabilities(logits, temperature))


def _numpy(tensor) -> np.ndarray:
    return keras.ops.convert_to_numpy(tensor)


def _score(probabilities: np.ndarray, names: np.ndarray, classes: list[str]) -> SplitScores:
    board = Scoreboard(tuple(classes))
    board.add_probabilities(names, probabilities)
    per_class_f1 = {row["label"]: row["f1"] for row in board.per_class()}
    return SplitScores(**vars(board.scores()), per_class_f1=per_class_f1)
