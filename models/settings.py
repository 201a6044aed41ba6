"""The model layer's settings that a command line offers, importable without Keras.

The shipped bundle, the backbone's arithmetic, the features a head reads and the head's
hyperparameters: flags take their defaults and choices from here, so that a command's --help
and its flag checks answer at once instead of after TensorFlow's seconds of loading. The
modules that build and run models use the same names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_BUNDLE = str(Path(__file__).parent / "default_bundle")
PRECISIONS = ("auto", "float32", "bfloat16")
ENGINES = ("auto", "keras", "openvino")  # what runs a bundle's classifier at prediction
FEATURE_KINDS = ("pooled", "stage_stats", "stage_covariance")
# What models.backbones builds (a test holds the two equal): a bundle names them, and its
# manifest is checked before anything imports Keras.
BACKBONE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50")


def check_backbone_names(spec: str) -> None:
    """A backbone name, or several joined by '+' (an ensemble); ValueError names one unknown."""
    for name in spec.split("+"):
        if name not in BACKBONE_NAMES:
            raise ValueError(f"Unknown backbone {name!r}; known: {', '.join(BACKBONE_NAMES)}")


@dataclass(frozen=True)
class HeadConfig:
    # The defaults are the shipped model's: chosen on WikiArt16's train split (folds, out of fold).
    hidden_units: int = 256  # 0: a linear (multinomial logistic) head
    dropout: float = 0.6
    l2: float = 1e-4
    label_smoothing: float = 0.03
    learning_rate: float = 1e-3
    epochs: int = 600
    batch_size: int = 128
    patience: int = 10
    seed: int = 0
    class_balance: float = 1.0  # 1: every style weighs alike; 0: every painting does
    projection: int = 0  # the merged head's first layer, projected to this many numbers

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VoteConfig:
    # The training paintings' vote (models/vote.py), chosen on a fold of wikiart-large's
    # train split (docs/experiments.md).
    voters: int = 30  # the nearest training paintings that vote; 0: no vote
    weight: float = 0.4  # the vote's share of the bundle's probabilities
    dimension: int = 160  # the numbers each painting is kept as: most of a bundle's bytes
    sharpness: float = 0.05  # how fast a vote's weight falls with its distance


# What --search can ask of a new index: exact up to models.vector_index.EXACT_LIMIT items and
# approximate (IVF) past it, or either whatever its size.
INDEX_SEARCHES = ("auto", "exact", "approximate")
# The embedding's fingerprint part (models/fingerprint.py): its numbers, at most. With the
# shipped model's 256 of projection and 16 styles, the whole vector is 512 float16 numbers,
# 1 KB a painting.
FINGERPRINT_DIMENSION = 240
# The layer that averages a backbone's last map without its outer ring
# (models.backbones.centre_pooled): the fingerprint's source, and where OpenVINO's bfloat16
# backbone hands it to the float32 head (models.openvino_engine.split_at_head).
CENTRE_POOLED = "centre_pooled"
# The training paintings the fingerprint's whitening is fitted on, at most: a sample,
# read by a pass of its own (pipeline.train); half as many fit it nearly as well (docs/similar.md).
FINGERPRINT_PAINTINGS = 4000
# The share of the style part's squared length that the style probabilities take (their
# square roots), the head's projection taking the rest: the probabilities say outright what
# the projection says among much else (docs/similar.md measures the share).
STYLE_PROBABILITY_SHARE = 0.3
# The fingerprints' distance within which two paintings are the same picture, that training
# writes into a bundle's embedding: what similar paintings put first, and what
# `python -m pipeline.duplicates` lists by default. For the shipped model's fingerprint, a
# round distance that lists at least 98% of altered copies and fewer than 1 in 1,000 pairs
# of distinct paintings (measured with `python -m bench.similar_quality`; docs/similar.md).
SAME_PICTURE_DISTANCE = 0.6
