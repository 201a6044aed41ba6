"""bench.similar on a small scale: its synthetic embeddings, and one whole run."""

import json

import numpy as np
import pytest

from bench.similar import SyntheticEmbeddings, exact_truth, main
from models.vector_index import EXACT_LIMIT


def test_synthetic_embeddings_are_unit_float16_values_with_planted_copies():
    data = SyntheticEmbeddings(dimension=32)
    vectors = data.vectors(2500)
    assert vectors.shape == (2500, 32) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, vectors.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)
    np.testing.assert_array_equal(data.vectors(2500), vectors)  # seeded
    pairs = data.planted_pairs(2500)
    assert len(pairs) == 25
    distances = [1 - vectors[a] @ vectors[b] for a, b in pairs]
    assert max(distances) < 0.01  # a copy is near its original ...
    assert np.median(1 - vectors[:100] @ vectors[100:200].T) > 0.5  # ... others are not


def test_the_exact_truth_is_the_k_nearest_across_blocks(monkeypatch):
    monkeypatch.setattr("bench.similar.SHARD_ROWS", 7)
    rng = np.random.default_rng(0)
    vectors, queries = rng.normal(size=(40, 4)), rng.normal(size=(3, 4))
    expected = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    np.testing.assert_array_equal(exact_truth(vectors, queries), expected)


def test_a_small_run_measures_every_figure(tmp_path):
    output = tmp_path / "similar.json"
    main(["--output", str(output), "--dimension", "16", "--sizes", "3000", "--queries", "20",
          "--exact_sizes", "500", "1000"])  # fmt: skip
    results = json.loads(output.read_text())
    assert results["exact_limit_in_code"] == EXACT_LIMIT
    assert set(results["exact_one_query_by_size"]) == {"500", "1000"}
    at = results["3000"]
    for build in (at["build_exact"], at["build_approximate"]):
        assert build["wall_s"] > 0 and build["peak_rss_mb"] > 0
        assert build["vector_bytes_per_painting"] >= 16 * 4  # float32 in FAISS
    assert at["approximate_recall_at_10"] == pytest.approx(1, abs=0.1)
    assert at["approximate_query"]["p50_ms"] > 0 and at["exact_query"]["p95_ms"] > 0
    assert at["approximate_query_two_parts"]["p50_ms"] > 0
    assert at["duplicates"]["planted"] == 30 and at["duplicates"]["planted_found_share"] >= 0.9
