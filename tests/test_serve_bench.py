"""The service's benchmarks: their arithmetic, a short run of `python -m pipeline.serve` as
its own process (the entry point, as the benchmark and production start it) under load, and
a short run of the similar paintings' benchmark (POST /similar against POST /predict)."""

from __future__ import annotations

import asyncio
import json

import pandas as pd
import pytest

from bench import serve_similar
from bench.serve import (
    compare_with_pipeline,
    latency_percentiles,
    measure_level,
    serving,
    targets,
)
from tests.conftest import CLASSES, COLOURS, painting
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


def test_similar_is_set_beside_predict_on_the_same_service():
    results = {"predict_p50_ms": 50.0, "similar_p50_ms": 55.0, "predict_without_index_p50_ms": 48.0}
    assert serve_similar.targets(results) == {
        "similar_p50_vs_predict_p50": pytest.approx(1.1),
        "predict_p50_with_index_vs_without": pytest.approx(50 / 48),
        "target_similar_vs_predict_met": True,
    }
    results["similar_p50_ms"] = 61.0
    assert not serve_similar.targets(results)["target_similar_vs_predict_met"]
    results["similar_p50_ms"] = None  # no answer in the time given
    assert not serve_similar.targets(results)["target_similar_vs_predict_met"]


@pytest.mark.slow  # a run of the pipeline, an index and two services of their own: a minute
def test_the_similar_benchmark_runs_the_pipeline_the_index_and_the_service(
    projection_bundle, tmp_path
):
    data = tmp_path / "data"
    names = [f"{style}-{i}.png" for style in CLASSES for i in range(3)]
    for i, name in enumerate(names):
        painting(data / "images" / name, COLOURS[name.split("-")[0]], seed=i)
    pd.DataFrame({"uri": [f"images/{name}" for name in names],
                  "style": [name.split("-")[0] for name in names],
                  "title": [f"Painting {i}" for i in range(len(names))]}).to_csv(
        data / "catalog.csv", index=False
    )  # fmt: skip
    output = tmp_path / "results.json"
    serve_similar.main([f"--model={projection_bundle}", f"--data={data}", "--images=6",
                        "--queries=3", "-k", "3", "--seconds=1", "--rounds=1",
                        "--precision=float32", f"--output={output}"])  # fmt: skip
    results = json.loads(output.read_text())
    assert results["indexed_paintings"] == 6 and results["self_found_first"] == 1.0
    for route in ("predict", "similar", "predict_without_index"):
        assert results[f"{route}_errors"] == 0 and results[f"{route}_p50_ms"] > 0
    assert results["similar_p50_vs_predict_p50"] > 0 and results["thumbnails"] == 3
