"""How well predictions match labels: the one scorer used by the pipeline and by training.

It only counts, so it can be merged: Beam combines one Scoreboard per worker, and training
fills one from a validation set. Rows whose label the model does not know are counted and
reported on their own instead of being dropped or scored as plain mistakes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

TOP_KS = (1, 3, 5)
CALIBRATION_BINS = 15


@dataclass(frozen=True, kw_only=True)
class Scores:
    """What a Scoreboard says of its rows: how many, how many errors of each kind, and,
    where rows have labels the model knows (`n_labelled`), how well it did. A top-k score
    is None where some row ranked fewer than k styles.

    Its JSON (`to_json`, `from_json`) is flat, and has no scores without labelled rows:
    summary.json and a bundle's manifest hold it so.
    """

    n_images: int
    n_errors: int
    errors_by_kind: dict[str, int]
    n_labelled: int
    n_unknown_label: int
    unknown_labels: dict[str, int]
    top1: float | None = None
    top3: float | None = None
    top5: float | None = None
    macro_f1: float | None = None
    ece: float | None = None

    def top_k(self, k: int) -> float | None:
        return getattr(self, f"top{k}")

    def to_json(self) -> dict[str, Any]:
        counted = {name: getattr(self, name) for name in COUNTS}
        if not self.n_labelled:
            return counted
        return counted | {name: getattr(self, name) for name in SCORES}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scores:
        """The keys of Scores in `data` (any others are left for the caller); KeyError names
        a count that is missing."""
        values: dict[str, Any] = {name: data[name] for name in COUNTS}
        values |= {name: data.get(name) for name in SCORES}
        return cls(**values)


@dataclass(frozen=True, kw_only=True)
class SplitScores(Scores):
    """A training split's scores, with each style's F1: what a bundle's manifest records per
    split."""

    per_class_f1: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "per_class_f1": self.per_class_f1}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SplitScores:
        return cls(**vars(Scores.from_json(data)), per_class_f1=data["per_class_f1"])


COUNTS = ("n_images", "n_errors", "errors_by_kind", "n_labelled", "n_unknown_label",
          "unknown_labels")  # fmt: skip
SCORES = tuple(f.name for f in fields(Scores) if f.name not in COUNTS)


@dataclass
class Scoreboard:
    classes: tuple[str, ...]
    n_images: int = 0
    errors_by_kind: Counter = field(default_factory=Counter)
    confusion: Counter = field(default_factory=Counter)  # (label, predicted) -> rows
    top_k_hits: Counter = field(default_factory=Counter)  # k -> rows with label in top k
    ranks_given: int = max(TOP_KS)  # fewest ranked styles in any row: top-k beyond is unknown
    unknown_labels: Counter = field(default_factory=Counter)
    bin_count: np.ndarray = field(default_factory=lambda: np.zeros(CALIBRATION_BINS))
    bin_confidence: np.ndarray = field(default_factory=lambda: np.zeros(CALIBRATION_BINS))
    bin_correct: np.ndarray = field(default_factory=lambda: np.zeros(CALIBRATION_BINS))

    def add(
        self,
        label: str | None,
        ranked_styles: Sequence[str] | None,
        confidence: float | None,
        error: str | None = None,
    ) -> None:
        """Counts one prediction row (ranked_styles best first), or one error row."""
        self.n_images += 1
        if error is not None:
            self.errors_by_kind[error.split(":", 1)[0]] += 1
            return
        if label is None:
            return
        # A row without an error is a prediction: it has its ranked styles and confidence.
        assert ranked_styles is not None and confidence is not None
        self.confusion[(label, ranked_styles[0])] += 1
        if label not in self.classes:
            self.unknown_labels[label] += 1
            return
        self.ranks_given = min(self.ranks_given, len(ranked_styles))
        for k in TOP_KS:
            self.top_k_hits[k] += label in ranked_styles[:k]
        b = min(int(confidence * CALIBRATION_BINS), CALIBRATION_BINS - 1)
        self.bin_count[b] += 1
        self.bin_confidence[b] += confidence
        self.bin_correct[b] += label == ranked_styles[0]

    def add_probabilities(self, labels: Iterable[str], probabilities: np.ndarray) -> None:
        """Counts a whole labelled set scored by a model (rows of class probabilities)."""
        ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, : max(TOP_KS)]
        for label, order, probs in zip(labels, ranked, probabilities, strict=True):
            self.add(label, [self.classes[i] for i in order], float(probs[order[0]]))

    def merge(self, other: Scoreboard) -> None:
        self.n_images += other.n_images
        self.errors_by_kind.update(other.errors_by_kind)
        self.confusion.update(other.confusion)
        self.top_k_hits.update(other.top_k_hits)
        self.ranks_given = min(self.ranks_given, other.ranks_given)
        self.unknown_labels.update(other.unknown_labels)
        self.bin_count += other.bin_count
        self.bin_confidence += other.bin_confidence
        self.bin_correct += other.bin_correct

    @property
    def n_labelled(self) -> int:
        """Predicted rows whose label the model knows: the denominator of every score."""
        return int(self.bin_count.sum())

    def scores(self) -> Scores:
        counts = Scores(
            n_images=self.n_images,
            n_errors=sum(self.errors_by_kind.values()),
            errors_by_kind=dict(sorted(self.errors_by_kind.items())),
            n_labelled=self.n_labelled,
            n_unknown_label=sum(self.unknown_labels.values()),
            unknown_labels=dict(sorted(self.unknown_labels.items())),
        )
        if not self.n_labelled:
            return counts
        top_k: dict[str, Any] = {
            f"top{k}": self.top_k_hits[k] / self.n_labelled if k <= self.ranks_given else None
            for k in TOP_KS
        }
        return replace(
            counts, **top_k, macro_f1=self.macro_f1(), ece=self.expected_calibration_error()
        )

    def per_class(self) -> list[dict[str, Any]]:
        """Precision, recall, F1 and support of every class the model knows."""
        known = {(t, p): n for (t, p), n in self.confusion.items() if t in self.classes}
        rows = []
        for name in self.classes:
            true_positives = known.get((name, name), 0)
            support = sum(n for (t, _), n in known.items() if t == name)
            predicted = sum(n for (_, p), n in known.items() if p == name)
            precision = true_positives / predicted if predicted else 0.0
            recall = true_positives / support if support else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            rows.append(
                {
                    "label": name,
                    "precision": precision,
                    "recall": recall,
                    "f1": f1,
                    "support": support,
                }
            )
        return rows

    def macro_f1(self) -> float:
        """Mean F1 over the classes present in the labels (absent ones have no recall)."""
        f1s = [row["f1"] for row in self.per_class() if row["support"]]
        return float(np.mean(f1s)) if f1s else 0.0

    def expected_calibration_error(self) -> float:
        """Mean |accuracy - confidence| over confidence bins, weighted by rows per bin."""
        filled = self.bin_count > 0
        gaps = np.abs(self.bin_correct[filled] - self.bin_confidence[filled])
        return float(gaps.sum() / self.bin_count.sum())

    def reliability(self) -> list[dict[str, Any]]:
        """Per confidence bin: rows, mean confidence and accuracy (a reliability diagram)."""
        return [
            {
                "bin_low": b / CALIBRATION_BINS,
                "count": int(n),
                "confidence": self.bin_confidence[b] / n,
                "accuracy": self.bin_correct[b] / n,
            }
            for b, n in enumerate(self.bin_count)
            if n
        ]
