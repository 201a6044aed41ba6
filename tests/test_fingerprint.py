"""The embedding's fingerprint: fitted as a whitening of the backbones' pooled maps, saved
small, refused with one line when its file is not one, or whitens another source."""

import numpy as np
import pytest

from models.embedding import FINGERPRINT, STYLE, EmbeddingSpec, EmbeddingSpecError
from models.fingerprint import SOURCE, Fingerprint, FingerprintError, source_of


def pooled_features(n: int, seed: int = 0) -> np.ndarray:
    """Two backbones' features, 12 and 9 wide, each beginning with 5 and 4 pooled numbers
    (non-negative, as averages of activations are), of correlated pictures: the source is
    at `COLUMNS` of them."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=(n, 3))
    pooled = np.abs(shared @ rng.normal(size=(3, 9)) + 0.3 * rng.normal(size=(n, 9)))
    rest = rng.normal(size=(n, 12))
    return np.concatenate([pooled[:, :5], rest[:, :7], pooled[:, 5:], rest[:, 7:]], axis=1)


COLUMNS = [(0, 5), (12, 16)]


def test_it_whitens_the_training_paintings_sources():
    features = pooled_features(400)
    fingerprint = Fingerprint.fitted(features, COLUMNS, dimension=6)
    whitened = (np.asarray(source_of(features, COLUMNS)) - fingerprint.mean) @ fingerprint.matrix
    np.testing.assert_allclose(np.cov(whitened.T, bias=True), np.eye(6), atol=1e-3)
    assert fingerprint.dimension == 6


def test_the_source_roots_each_backbones_pooled_features_at_unit_length():
    features = np.array([[4.0, 0.0, 7.0, 9.0, 16.0, 0.0]])  # 7: not pooled, left out
    source = np.asarray(source_of(features, [(0, 2), (3, 6)]))
    np.testing.assert_allclose(source, [[1, 0, 0.6, 0.8, 0]])


def test_a_few_paintings_give_as_many_directions_as_they_span():
    assert Fingerprint.fitted(pooled_features(4), COLUMNS, dimension=6).dimension == 3


def test_its_fingerprints_are_unit_vectors_and_a_copy_lies_nearer_its_original():
    features = pooled_features(300)
    fingerprint = Fingerprint.fitted(features, COLUMNS, dimension=8)
    copies = features[:20] * 1.05 + 0.01 * np.random.default_rng(9).normal(size=(20, 21))
    ours = np.asarray(fingerprint.of(np.concatenate([features[:40], copies])))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    originals, altered = ours[:40], ours[40:]
    assert np.array_equal(np.argmax(altered @ originals.T, axis=1), np.arange(20))


def test_it_is_saved_in_float16_and_read_back(tmp_path):
    fingerprint = Fingerprint.fitted(pooled_features(200), COLUMNS, dimension=5)
    fingerprint.save(str(tmp_path / "fingerprint.npz"))
    read = Fingerprint.load(str(tmp_path / "fingerprint.npz"))
    assert read.columns == ((0, 5), (12, 16))
    assert read.paintings == fingerprint.paintings == 200
    np.testing.assert_allclose(read.matrix, fingerprint.matrix, rtol=1e-3, atol=1e-3)


def test_a_file_that_is_not_a_fingerprint_is_one_line(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FingerprintError, match=r"junk\.npz is not a readable fingerprint"):
        Fingerprint.load(str(tmp_path / "junk.npz"))
    with pytest.raises(FingerprintError, match="missing"):
        Fingerprint.load(str(tmp_path / "absent.npz"))
    np.savez(tmp_path / "odd.npz", source=SOURCE, paintings=9, columns=np.array([[0, 5]]),
             mean=np.zeros(4), matrix=np.zeros((5, 2)))  # fmt: skip
    with pytest.raises(FingerprintError, match="do not agree"):
        Fingerprint.load(str(tmp_path / "odd.npz"))


def test_a_fingerprint_of_another_source_is_refused_with_one_line(tmp_path):
    """An earlier version's file, fitted on the whole maps' averages, has no `source`."""
    fingerprint = Fingerprint.fitted(pooled_features(50), COLUMNS, dimension=5)
    np.savez(tmp_path / "fingerprint.npz", columns=np.asarray(COLUMNS), mean=fingerprint.mean,
             matrix=fingerprint.matrix)  # fmt: skip
    with pytest.raises(FingerprintError, match=r"fingerprint\.npz whitens whole maps' averages, "
                       "not centre_pooled_last_maps: train the bundle again$"):  # fmt: skip
        Fingerprint.load(str(tmp_path / "fingerprint.npz"))


def test_a_spec_of_two_parts_reads_back_and_splits_its_vectors():
    spec = EmbeddingSpec(8, "style_and_fingerprint", fingerprint_dimension=3)
    assert EmbeddingSpec.from_json(spec.to_json(), "here") == spec
    assert "5 of style, 3 of fingerprint" in spec.describe()
    vectors = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    assert spec.part(vectors, STYLE).shape == (4, 5)
    np.testing.assert_allclose(
        np.linalg.norm(spec.part(vectors, FINGERPRINT), axis=1), 1, atol=1e-6
    )
    stored = np.concatenate([spec.part(vectors, STYLE), spec.part(vectors, FINGERPRINT)], 1)
    stored /= np.sqrt(2)
    similarities = spec.query(vectors, FINGERPRINT) @ stored.T
    cosines = spec.part(vectors, FINGERPRINT) @ spec.part(vectors, FINGERPRINT).T
    np.testing.assert_allclose(similarities, cosines, atol=1e-5)


def test_a_fingerprint_as_long_as_the_vector_is_refused():
    with pytest.raises(EmbeddingSpecError, match="fingerprint_dimension"):
        EmbeddingSpec.from_json({"dimension": 4, "kind": "k", "fingerprint_dimension": 4}, "m")
    with pytest.raises(EmbeddingSpecError, match="whole number"):
        EmbeddingSpec.from_json({"dimension": 4, "kind": "k", "fingerprint_dimension": "2"}, "m")
