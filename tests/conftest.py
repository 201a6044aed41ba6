"""Shared fixtures: small images made here, and a small real model bundle."""

from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from models.bundle import BackboneSpec, HeadSpec, Manifest, save_bundle
from models.cache import CACHE_DIR_VARIABLE
from models.embedding import STYLE_AND_FINGERPRINT, EmbeddingSpec
from models.fingerprint import Fingerprint
from models.head import HeadConfig, build_head, low_rank_head, merge_heads
from models.settings import VoteConfig
from models.vote import TrainingVote
from tests.faulty_host import faulty_host, flaky_filesystem  # noqa: F401 (fixtures for all)

CLASSES = ["Blue_Period", "Green_Period", "Red_Period"]
COLOURS = {"Blue_Period": (30, 60, 200), "Green_Period": (40, 170, 60), "Red_Period": (210, 40, 30)}


def painting(
    path: Path, colour: tuple[int, int, int], seed: int, size=(96, 72), shapes: int = 0
) -> Path:
    """A noisy field of one colour: stands in for a painting in a style of that colour. With
    `shapes`, that many blocks of other colours on it, placed by `seed`: another picture for
    each seed (fields alone are the same picture to a fingerprint, whatever their noise)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(colour, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    for _ in range(shapes):
        left, top = rng.integers(0, size[0] * 3 // 4), rng.integers(0, size[1] * 3 // 4)
        width, height = (
            rng.integers(size[0] // 8, size[0] // 3),
            rng.integers(size[1] // 8, size[1] // 3),
        )
        pixels[top : top + height, left : left + width] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def lite0_manifest(
    model_id: str,
    classes: list[str],
    embedding: EmbeddingSpec | None = None,
    vote: TrainingVote | None = None,
) -> Manifest:
    """The manifest of a head over EfficientNet-Lite0's pooled features, for tests."""
    return Manifest(
        id=model_id,
        version="0",
        backbone=BackboneSpec(name="efficientnet_lite0", input_size=224, feature_kind="pooled"),
        head=HeadSpec(temperature=1.0),
        classes=tuple(classes),
        embedding=embedding,
        vote=None if vote is None else vote.record(),
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


PROJECTION = 8  # the head's projection in `projection_bundle`: its embedding's style part
FINGERPRINT = 12  # the fingerprint's numbers in `projection_bundle`
EMBEDDING_DIMENSION = PROJECTION + len(CLASSES) + FINGERPRINT
# Its fingerprints' distance for the same picture: the tests' pictures, whole or at half
# size, are nearer; two of them are not (their blocks are all that tells them apart).
SAME_PICTURE = 0.05
TINY_VOTE = VoteConfig(voters=5, dimension=8)  # `projection_bundle`'s


def projection_bundle_at(path: Path, model_id: str = "tiny-projection-model") -> str:
    """EfficientNet-Lite0 with a seeded 3-style head that reads its features through a
    projection to PROJECTION numbers, and a fingerprint of FINGERPRINT numbers, as
    `--projection` trains them: its embedding; and the vote of 64 made-up training
    paintings' features, as `--voters` keeps them."""
    features = np.random.default_rng(1).normal(size=(64, 1280)).astype(np.float32)
    keras.utils.set_random_seed(1)
    merged = merge_heads([build_head(features, len(CLASSES), HeadConfig(hidden_units=16, seed=1))])
    head = low_rank_head(merged, features, PROJECTION)
    fingerprint = Fingerprint.fitted(pictures_sources(path.parent / "pictures"), [(0, 1280)],
                                     FINGERPRINT)  # fmt: skip
    embedding = EmbeddingSpec(EMBEDDING_DIMENSION, STYLE_AND_FINGERPRINT, FINGERPRINT, SAME_PICTURE)
    labels = np.arange(len(features)) % len(CLASSES)
    vote = TrainingVote.fitted(np.abs(features), labels, len(CLASSES), TINY_VOTE)
    manifest = lite0_manifest(model_id, CLASSES, embedding, vote)
    save_bundle(str(path), manifest, head, fingerprint, vote)
    return str(path)


def pictures_sources(folder: Path, n: int = 40) -> np.ndarray:
    """EfficientNet-Lite0's fingerprint sources of `n` pictures with shapes, of every colour:
    what a fingerprint is fitted on (training paintings')."""
    from models.backbones import feature_extractor
    from transforms.images import decode_image

    rng = np.random.default_rng(2)
    paths = [painting(folder / f"{i}.png", tuple(rng.integers(0, 256, 3)), seed=1000 + i,
                      shapes=6) for i in range(n)]  # fmt: skip
    images = np.stack([decode_image(path.read_bytes(), size=224) for path in paths])
    extractor = feature_extractor("efficientnet_lite0", "pooled", fingerprint_source=True)
    return np.asarray(extractor.predict_on_batch(images)[1])


@pytest.fixture(scope="session")
def projection_bundle(tmp_path_factory) -> str:
    """A tiny bundle that gives embeddings (see projection_bundle_at)."""
    return projection_bundle_at(tmp_path_factory.mktemp("bundle") / "projection")
