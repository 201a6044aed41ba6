"""The service's benchmark: its arithmetic, and a short run of `python -m pipeline.serve` as
its own process (the entry point, as the benchmark and production start it) under load."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest

from bench.serve import (
    compare_with_pipeline,
    latency_percentiles,
    measure_level,
    serving,
    targets,
)
from tests.serve_support import painting_bytes


def test_percentiles_are_in_milliseconds_and_none_without_latencies():
    summary = latency_percentiles([i / 1000 for i in range(1, 101)])  # 1 ms ... 100 ms
    assert summary["p50_ms"] == pytest.approx(50.5)
    assert summary["p95_ms"] == pytest.approx(95.05)
    assert summary["p99_ms"] == pytest.approx(99.01)
    assert latency_percentiles([]) == {"p50_ms": None, "p95_ms": None, "p99_ms": None}


def test_targets_compare_start_up_memory_the_most_clients_and_one_client_with_their_references():
    results = {
        "levels": [
            {"clients": 1, "images_per_s": 10.0, "p50_ms": 90.0},
            {"clients": 16, "images_per_s": 95.0, "p50_ms": 200.0},
        ],
        "pipeline_images_per_s": 100.0,
        "one_image_latency_ms": 50.0,
        "ready_s": 4.0,
        "service_peak_rss_mb": 600.0,
        "keras_service_peak_rss_mb": 1200.0,
    }
    assert targets(results) == {
        "service_vs_pipeline_at_16_clients": pytest.approx(0.95),
        "p50_at_1_client_vs_one_image_latency": pytest.approx(1.8),
        "peak_rss_vs_keras_service": pytest.approx(0.5),
        "target_ready_met": True,
        "target_memory_met": True,
        "target_vs_pipeline_met": True,
        "target_p50_met": True,
    }
    results["levels"][0]["p50_ms"] = 120.0
    results["levels"][1]["images_per_s"] = 85.0
    results |= {"ready_s": 5.0, "service_peak_rss_mb": 800.0}
    missed = {key: value for key, value in targets(results).items() if key.startswith("target")}
    assert not any(missed.values()), missed


def test_the_services_answers_are_set_beside_the_pipelines_rows_for_the_same_files():
    rows = pd.DataFrame(
        {"top_k_styles": [["a", "b"], ["b", "a"]], "top_k_probabilities": [[0.7, 0.3], [0.6, 0.4]]},
        index=pd.Index(["x.jpg", "y.jpg"], name="uri"),
    )
    answers = [
        {"top_k_styles": ["a", "b"], "top_k_probabilities": [0.7, 0.3]},
        {"top_k_styles": ["b", "a"], "top_k_probabilities": [0.6001, 0.3999]},
    ]
    assert compare_with_pipeline(answers, ["x.jpg", "y.jpg"], rows) == {
        "compared_images": 2,
        "max_abs_diff_vs_pipeline": pytest.approx(1e-4),
        "same_styles_as_pipeline": True,
    }
    answers[0]["top_k_styles"] = ["b", "a"]
    assert not compare_with_pipeline(answers, ["x.jpg", "y.jpg"], rows)["same_styles_as_pipeline"]


@pytest.mark.slow  # a process of its own: TensorFlow's import and the model, ten seconds
def test_the_service_runs_as_its_own_process_and_answers_under_load(tiny_bundle, tmp_path):
    bodies = [painting_bytes(tmp_path, "Red_Period", seed) for seed in range(4)]
    flags = ["--max_batch=4", "--max_wait_ms=5", "--precision=float32", "--no_heatmaps"]
    with serving(tiny_bundle, flags, tmp_path / "serve.log") as server:
        level = asyncio.run(measure_level(server.url, bodies, 2, seconds=1.0, warm_up_s=0.2))
        assert server.peak_rss_mb() > 100 and server.ready_s > 0
    assert server.process.returncode is not None  # stopped when the block ended
    assert level["clients"] == 2 and level["errors"] == 0
    assert level["images_per_s"] > 0 and 0 < level["p50_ms"] <= level["p99_ms"]
