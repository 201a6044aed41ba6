"""bench.embedding_choice's measures, on small made-up vectors with known answers."""

import numpy as np
import pytest

from bench.embedding_choice import (
    fingerprint_scores,
    first_candidates,
    own_style_share,
    ranked,
)
from models.embedding import unit_vectors


def test_copies_find_their_originals_and_the_threshold_lists_no_distinct_pair():
    paintings = unit_vectors(np.eye(6, 8) + 0.01)
    copies = unit_vectors(paintings[[1, 4]] + 0.05 * np.eye(2, 8, 6))
    scores = fingerprint_scores(paintings, copies, np.array([1, 4]), np.ones(6, bool))
    assert scores["nearest_is_original"] == 1.0
    assert 0 < scores["distance_for_98_percent_of_copies"] < 0.01
    assert scores["distinct_pairs_listed_there"] == 0.0


def test_own_style_share_counts_the_nearest_train_paintings_of_the_same_label():
    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [1, 0.05]], np.float32)
    labels = np.array(["a", "a", "b", "b", "b"])
    train = np.array([True, True, True, True, False])
    assert own_style_share(vectors, labels, train) == pytest.approx(0.5)  # K=10: 2 of 4 are a


def test_the_rules_put_their_same_pictures_first_then_the_style_order():
    fingerprints = unit_vectors(np.array([[1, 0.04, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]))
    query = unit_vectors(np.array([[1, 0.03, 0]]))
    (every,) = first_candidates(fingerprints, query, 0.1, "all")
    assert every.tolist() == [0, 1]  # both within, the nearer first
    assert [ids.tolist() for ids in first_candidates(fingerprints, query, 0.1, "nearest")] == [[0]]
    assert [ids.tolist() for ids in first_candidates(fingerprints, query, 1e-5, "nearest")] == [[]]
    even = unit_vectors(np.array([[1, 0.02, 0]]))  # as near to both: the ratio test refuses
    assert [ids.tolist() for ids in first_candidates(fingerprints, even, 0.1, "ratio")] == [[]]
    assert [ids.tolist() for ids in first_candidates(fingerprints, query, 0.1, "ratio")] == [[0]]
    lists = ranked(np.array([[3, 1, 2]]), [np.array([1])], k=3)
    assert lists.tolist() == [[1, 3, 2]]
