"""The training paintings' vote: a painting's style as its nearest training paintings have it.

The head generalises over styles; what it smooths away is each artist's own manner, which
their other paintings in the training set still show. So the bundle keeps every training
painting as a short vector (its features standardised, projected on their principal
directions and whitened, at unit length), and a painting's `voters` nearest ones vote
for their styles: each vote weighs exp(similarity / sharpness), relative to the nearest,
and each style's votes are divided by its paintings in the memory, so that a large style
does not win by its numbers alone. The vote is mixed into the head's probabilities
(`weight` of it), and the mixture is calibrated by a temperature of its own, fitted on the
training paintings' out-of-fold probabilities mixed with their votes from all the others.

The projection is fitted without labels, so a training painting's vote from the others
behaves as a new painting's does: that is what the temperature is fitted on. The head's
projection (the embedding's style part) places the training paintings by the labels the
head learned, and votes there were calibrated on nothing comparable (docs/experiments.md
measures both).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np

from models.embedding import unit_vectors
from models.settings import VoteConfig

VOTE_FILE = "vote.npz"
SCALE_FLOOR = 1e-3  # a feature's deviation below this counts as this: (nearly) constant ones
QUERY_CHUNK = 2048  # training paintings voted on at a time, when calibrating
INT8_STEPS = 127  # a stored vector's numbers, as int8 multiples of the largest / 127


class VoteError(ValueError):
    """A vote file that cannot be read or does not fit its bundle."""


@dataclass(frozen=True)
class TrainingVote:
    """The memory (`vectors` of the training paintings, their `labels`), the map from
    features to a vector ((features - mean) @ matrix), and how votes are counted and
    mixed in."""

    mean: np.ndarray  # (features,)
    matrix: np.ndarray  # (features, dimension)
    vectors: np.ndarray  # (paintings, dimension), unit length
    labels: np.ndarray  # (paintings,) class indices
    n_classes: int
    voters: int
    sharpness: float
    weight: float
    temperature: float = 1.0

    @property
    def dimension(self) -> int:
        return int(self.matrix.shape[1])

    @classmethod
    def fitted(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        n_classes: int,
        config: VoteConfig,
        seed: int = 0,
    ) -> TrainingVote:
        """The memory of `features` (the training paintings as they are), not yet
        calibrated: at most `config.dimension` directions, and as many as the paintings
        span."""
        from sklearn.decomposition import PCA

        rows = np.asarray(features, np.float32)
        mean = rows.mean(axis=0)
        scale = rows.std(axis=0) + SCALE_FLOOR
        standardised = (rows - mean) / scale
        components = max(1, min(config.dimension, len(rows) - 1, rows.shape[1]))
        pca = PCA(components, svd_solver="randomized", whiten=True, random_state=seed)
        memory = pca.fit_transform(standardised)
        kept = pca.explained_variance_ > 0
        matrix = pca.components_[kept].T / np.sqrt(pca.explained_variance_[kept]) / scale[:, None]
        vote = cls(
            mean=(mean + scale * pca.mean_).astype(np.float32),
            matrix=matrix.astype(np.float32),
            vectors=unit_vectors(memory[:, kept]),
            labels=np.asarray(labels, np.int64),
            n_classes=n_classes,
            voters=max(1, min(config.voters, len(rows) - 1)),
            sharpness=config.sharpness,
            weight=config.weight,
        )
        return vote.stored()

    def stored(self) -> TrainingVote:
        """As the file keeps it (vectors rounded to int8): fitting scores and calibrates the
        memory the bundle will hold, not a finer one."""
        return replace(self, vectors=_from_int8(*_to_int8(self.vectors)))

    def calibrated(
        self, out_of_fold: np.ndarray, left_out_votes: np.ndarray, labels: np.ndarray
    ) -> TrainingVote:
        """Its temperature fitted on the training paintings: the head's calibrated
        out-of-fold probabilities for them, each mixed with its vote from all the others."""
        from models.head import fit_temperature

        log_mixed = replace(self, temperature=1.0).mixture_scores(out_of_fold, left_out_votes)
        return replace(self, temperature=fit_temperature(np.asarray(log_mixed), labels))

    def left_out_votes(self) -> np.ndarray:
        """Each training painting's vote from all the others."""
        votes = []
        for start in range(0, len(self.vectors), QUERY_CHUNK):
            similarities = self.vectors[start : start + QUERY_CHUNK] @ self.vectors.T
            rows = np.arange(len(similarities))
            similarities[rows, start + rows] = -np.inf
            votes.append(np.asarray(self.votes_from(similarities)))
        return np.concatenate(votes)

    def votes(self, features: Any) -> Any:
        """Features (a batch, NumPy or Keras tensors) -> each painting's vote, (batch,
        classes), rows summing to 1."""
        from keras import ops

        projected = ops.matmul(ops.cast(features, "float32") - self.mean, self.matrix)
        return self.votes_from(
            ops.matmul(ops.normalize(projected, axis=-1, order=2), self.vectors.T)
        )

    def votes_from(self, similarities: Any) -> Any:
        """Each row's vote, given its similarities to every training painting: its `voters`
        nearest count their ballots, each weighed by its similarity relative to the
        nearest's. The voters are taken unsorted: OpenVINO's CPU plugin spent more on
        sorting them than on the rest of the classifier's head."""
        from keras import ops

        similarity, voter = ops.top_k(similarities, self.voters, sorted=False)
        weights = ops.exp(
            (similarity - ops.max(similarity, axis=-1, keepdims=True)) / self.sharpness
        )
        ballots = ops.take(self._ballots(), voter, axis=0)  # (rows, voters, classes)
        tally = ops.sum(weights[..., None] * ballots, axis=1)
        return tally / ops.sum(tally, axis=-1, keepdims=True)

    def _ballots(self) -> np.ndarray:
        """(paintings, classes): each painting's ballot for its style, worth 1 / the style's
        paintings in the memory."""
        per_style = np.bincount(self.labels, minlength=self.n_classes).astype(np.float32)
        ballots = np.zeros((len(self.labels), self.n_classes), np.float32)
        ballots[np.arange(len(self.labels)), self.labels] = 1.0 / per_style[self.labels]
        return ballots

    def scores(self, head_probabilities: Any, features: Any) -> Any:
        """Scores whose softmax is the bundle's probabilities: the head's (calibrated) mixed
        with the vote."""
        return self.mixture_scores(head_probabilities, self.votes(features))

    def mixture(self, head_probabilities: Any, votes: Any) -> Any:
        """`weight` of the votes mixed into the head's probabilities, calibrated."""
        from keras import ops

        return ops.softmax(self.mixture_scores(head_probabilities, votes), axis=-1)

    def mixture_scores(self, head_probabilities: Any, votes: Any) -> Any:
        from keras import ops

        # (1 - w) p + w v, written so: OpenVINO's CPU plugin crashed compiling two scaled
        # terms summed, for batches of 4 and more.
        mixed = head_probabilities + self.weight * (votes - head_probabilities)
        return ops.log(ops.maximum(mixed, 1e-12)) / self.temperature

    def record(self) -> dict[str, Any]:
        """What the manifest says of it: its file, and for people what the file holds."""
        return {
            "file": VOTE_FILE,
            "paintings": len(self.labels),
            "dimension": self.dimension,
            "voters": self.voters,
            "weight": self.weight,
            "sharpness": self.sharpness,
            "temperature": self.temperature,
        }

    def save(self, path: str) -> None:
        """The vectors as int8 and the projection as float16, a quarter and a half of their
        float32 bytes: the memory is most of a bundle's size (docs/experiments.md measures
        what the rounding costs)."""
        steps, step = _to_int8(self.vectors)
        with fsspec.open(path, "wb") as file:
            np.savez(
                file,
                mean=self.mean.astype(np.float16),
                matrix=self.matrix.astype(np.float16),
                vectors=steps,
                step=np.asarray(step, np.float32),
                labels=self.labels.astype(np.int16),
                n_classes=np.asarray(self.n_classes),
                voters=np.asarray(self.voters),
                sharpness=np.asarray(self.sharpness),
                weight=np.asarray(self.weight),
                temperature=np.asarray(self.temperature),
            )

    @classmethod
    def load(cls, path: str) -> TrainingVote:
        """Reads a saved vote; VoteError names the file where it cannot."""
        try:
            with fsspec.open(path, "rb") as file, np.load(file, allow_pickle=False) as saved:
                vote = cls(
                    mean=saved["mean"].astype(np.float32),
                    matrix=saved["matrix"].astype(np.float32),
                    vectors=_from_int8(saved["vectors"], float(saved["step"])),
                    labels=saved["labels"].astype(np.int64),
                    n_classes=int(saved["n_classes"]),
                    voters=int(saved["voters"]),
                    sharpness=float(saved["sharpness"]),
                    weight=float(saved["weight"]),
                    temperature=float(saved["temperature"]),
                )
        except FileNotFoundError:
            raise VoteError(f"{path} is missing") from None
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as error:
            raise VoteError(f"{path} is not a readable vote file ({error})") from None
        problem = vote.problem()
        if problem:
            raise VoteError(f"{path}: {problem}")
        return vote

    def problem(self) -> str | None:
        width, dimension = self.matrix.shape if self.matrix.ndim == 2 else (-1, -1)
        if self.mean.shape != (width,) or self.vectors.shape[1:] != (dimension,):
            return "its mean, projection and vectors do not agree"
        if self.labels.shape != (len(self.vectors),) or not 0 < self.voters < len(self.labels):
            return "its labels, vectors and count of voters do not agree"
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < self.n_classes:
            return f"its labels must be class indices below {self.n_classes}"
        if not (self.sharpness > 0 and 0 <= self.weight <= 1 and self.temperature > 0):
            return "its sharpness and temperature must be above 0, its weight within 0..1"
        return None


def _to_int8(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    step = max(float(np.abs(vectors).max(initial=0.0)), 1e-12) / INT8_STEPS
    return np.round(vectors / step).astype(np.int8), step


def _from_int8(steps: np.ndarray, step: float) -> np.ndarray:
    return steps.astype(np.float32) * np.float32(step)
