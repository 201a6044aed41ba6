"""Shared fixtures: small images made here, and a small real model bundle."""

from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from models.bundle import BackboneSpec, HeadSpec, Manifest, save_bundle
from models.cache import CACHE_DIR_VARIABLE
from models.embedding import HEAD_PROJECTION, EmbeddingSpec
from models.head import HeadConfig, build_head, low_rank_head, merge_heads
from tests.faulty_host import faulty_host, flaky_filesystem  # noqa: F401 (fixtures for all)

CLASSES = ["Blue_Period", "Green_Period", "Red_Period"]
COLOURS = {"Blue_Period": (30, 60, 200), "Green_Period": (40, 170, 60), "Red_Period": (210, 40, 30)}


def painting(path: Path, colour: tuple[int, int, int], seed: int, size=(96, 72)) -> Path:
    """A noisy field of one colour: stands in for a painting in a style of that colour."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(colour, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def lite0_manifest(
    model_id: str, classes: list[str], embedding: EmbeddingSpec | None = None
) -> Manifest:
    """The manifest of a head over EfficientNet-Lite0's pooled features, for tests."""
    return Manifest(
        id=model_id,
        version="0",
        backbone=BackboneSpec(name="efficientnet_lite0", input_size=224, feature_kind="pooled"),
        head=HeadSpec(temperature=1.0),
        classes=tuple(classes),
        embedding=embedding,
    )


@pytest.fixture(scope="session", autouse=True)
def own_cache_folder(tmp_path_factory) -> Iterator[Path]:
    """What artstyle caches per machine (precision timings, converted models) goes in a
    folder of the test session's, for this process and the ones it starts: tests neither
    read the user's cache nor fill it."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_DIR_VARIABLE, str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> str:
    """EfficientNet-Lite0 (real ImageNet weights) with a seeded, untrained 3-style head."""
    path = tmp_path_factory.mktemp("bundle") / "tiny"
    features = np.random.default_rng(0).normal(size=(16, 1280)).astype(np.float32)
    keras.utils.set_random_seed(0)  # the head's initial weights: the same head every session
    head = merge_heads([build_head(features, len(CLASSES), HeadConfig(seed=0))])  # as trained
    save_bundle(str(path), lite0_manifest("tiny-test-model", CLASSES), head)
    return str(path)


PROJECTION = 8  # the embedding's dimension of `projection_bundle`


def projection_bundle_at(path: Path, model_id: str = "tiny-projection-model") -> str:
    """EfficientNet-Lite0 with a seeded 3-style head that reads its features through a
    projection to PROJECTION numbers, as `--projection` trains one: its embedding."""
    features = np.random.default_rng(1).normal(size=(64, 1280)).astype(np.float32)
    keras.utils.set_random_seed(1)
    merged = merge_heads([build_head(features, len(CLASSES), HeadConfig(hidden_units=16, seed=1))])
    head = low_rank_head(merged, features, PROJECTION)
    embedding = EmbeddingSpec(PROJECTION, HEAD_PROJECTION)
    save_bundle(str(path), lite0_manifest(model_id, CLASSES, embedding), head)
    return str(path)


@pytest.fixture(scope="session")
def projection_bundle(tmp_path_factory) -> str:
    """A tiny bundle that gives embeddings (see projection_bundle_at)."""
    return projection_bundle_at(tmp_path_factory.mktemp("bundle") / "projection")
