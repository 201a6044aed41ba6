"""The benchmark's arithmetic, and one whole run of it on a dozen made-up paintings."""

import json
import resource
import sys
import time
import urllib.error
import urllib.request

import keras
import numpy as np
import pandas as pd
import pytest

from bench.cli import comparisons, measure_engines, sample_catalog
from bench.cli import main as bench
from bench.engines import INSTALL_HINT, engine_paths, top_k_scores
from bench.fetch import latency_server
from bench.flags import parse_args
from bench.measure import (
    PipelineRun,
    fixed_batches,
    model_paths,
    pipeline_rates,
    raw_throughput,
    run_process,
    tile_batches,
)
from models.bundle import ModelBundle
from tests.conftest import CLASSES, COLOURS, painting


def run_of(n_images: int, wall_s: float, cpu_s: float) -> PipelineRun:
    """A pipeline run of `n_images`, as bench.measure.run_pipeline reports one."""
    return PipelineRun(wall_s, 900, cpu_s, n_images, 0, engine="keras", precision="float32")


def test_rates_come_from_the_two_runs_through_a_straight_line():
    # wall = 6 s of start-up + n / (10 images/s); CPU = 9 s + n x 0.15 s
    tiny = run_of(n_images=4, wall_s=6.4, cpu_s=9.6)
    main = run_of(n_images=2000, wall_s=206.0, cpu_s=309.0)
    rates = pipeline_rates(tiny, main)
    assert rates["images_per_s"] == pytest.approx(10.0)
    assert rates["startup_s"] == pytest.approx(6.0)
    assert rates["images_per_s_with_startup"] == pytest.approx(2000 / 206.0)
    assert rates["cpu_ms_per_image"] == pytest.approx(150.0)


def test_rates_are_unknown_when_the_larger_run_was_not_slower():
    tiny = run_of(n_images=4, wall_s=7.0, cpu_s=9.0)
    main = run_of(n_images=8, wall_s=6.9, cpu_s=9.1)
    rates = pipeline_rates(tiny, main)
    assert rates["images_per_s"] is None and rates["startup_s"] is None


def test_cpu_per_image_is_unknown_when_the_larger_run_took_no_more_cpu():
    tiny = run_of(n_images=4, wall_s=7.0, cpu_s=9.0)
    main = run_of(n_images=8, wall_s=7.5, cpu_s=8.9)
    assert pipeline_rates(tiny, main)["cpu_ms_per_image"] is None


def test_the_default_engine_is_compared_with_its_own_model_alone():
    """OpenVINO in bfloat16 runs with the head in float32: that path is its model alone."""
    results = {
        "pipeline_images_per_s": 40.0,
        "pipeline_cpu_ms_per_image": 50.0,
        "raw_images_per_s": 50.0,
        "raw_cpu_ms_per_image": 40.0,
        "reload_images_per_s": 2.0,
        "pipeline_default_images_per_s": 60.0,
        "pipeline_default_engine": "openvino",
        "pipeline_default_precision": "bfloat16",
        "engine_keras_float32_images_per_s": 40.0,
        "engine_openvino_bfloat16_images_per_s": 90.0,  # the whole model rounded: not it
        "engine_openvino_bfloat16_head_float32_images_per_s": 75.0,
    }
    ratios = comparisons(results)
    assert ratios["pipeline_vs_raw"] == pytest.approx(0.8)
    assert ratios["pipeline_default_vs_its_model_alone"] == pytest.approx(60 / 75)
    assert ratios["default_model_alone_vs_keras_float32"] == pytest.approx(75 / 40)
    without_engines = {k: v for k, v in results.items() if not k.startswith("engine_")}
    ratios = comparisons(without_engines)
    assert ratios["pipeline_default_vs_its_model_alone"] is None
    assert ratios["default_model_alone_vs_keras_float32"] is None


def test_a_large_sample_repeats_the_catalog_in_one_shuffled_order(tmp_path):
    pd.DataFrame({"uri": [f"{i}.jpg" for i in range(5)], "style": "x"}).to_csv(
        tmp_path / "catalog.csv", index=False
    )
    sample = sample_catalog(tmp_path, 12)
    assert len(sample) == 12
    assert sample["uri"].iloc[:5].tolist() == sample["uri"].iloc[5:10].tolist()
    assert sorted(sample["uri"].iloc[:5]) == sorted(str(tmp_path / f"{i}.jpg") for i in range(5))
    assert sample_catalog(tmp_path, 3)["uri"].tolist() == sample["uri"].iloc[:3].tolist()


def test_every_model_path_computes_the_pipelines_probabilities(tiny_bundle):
    bundle = ModelBundle.load(tiny_bundle)
    images = np.random.default_rng(0).uniform(0, 255, (3, 224, 224, 3)).astype(np.float32)
    inputs = tile_batches(images, batch_size=2, n_batches=2)
    assert inputs.shape == (4, 224, 224, 3)
    model = bundle.classifier()
    paths = model_paths(model, batch_size=2)
    paths["bfloat16"] = fixed_batches(bundle.classifier(precision="bfloat16"), batch_size=2)
    results = raw_throughput(paths, inputs, batch_size=2)
    assert results["raw_images_per_s"] > 0
    for path in ("predict_on_batch", "xla"):
        assert results[f"raw_{path}_images_per_s"] > 0
        assert results[f"raw_{path}_cpu_ms_per_image"] > 0
        assert results[f"raw_{path}_max_abs_diff"] < 1e-4
    assert results["raw_bfloat16_images_per_s"] > 0
    assert 0 < results["raw_bfloat16_max_abs_diff"] < 0.05  # rounded, not another function


def test_a_path_that_cannot_compile_the_model_is_reported_not_fatal():
    """XLA has no CPU kernel for some ops, such as Keras's antialiased Resizing layer."""
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Resizing(4, 4, antialias=True)(inputs))
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
    results = raw_throughput(model_paths(model, batch_size=2), images, batch_size=2)
    assert results["raw_predict_on_batch_images_per_s"] > 0
    assert "ScaleAndTranslate" in results["raw_xla_unsupported"]
    assert "raw_xla_images_per_s" not in results


def test_paths_take_turns_and_each_figure_is_the_median_of_its_rounds(monkeypatch):
    calls = []

    def path(name: str):
        def predict(x):
            calls.append(name)
            return np.zeros((len(x), 3), np.float32)

        return predict

    clock = iter(range(100))
    monkeypatch.setattr("bench.measure.time.perf_counter", lambda: float(next(clock)))
    inputs = np.zeros((4, 2, 2, 3), np.float32)
    results = raw_throughput(
        {"a": path("a"), "b": path("b")}, inputs, batch_size=2, rounds=3, prefix="engine"
    )
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-ups, then three rounds in turns
    assert results["engine_a_images_per_s"] == 4.0  # each call takes one tick of the clock
    assert results["engine_b_max_abs_diff"] == 0.0 and "engine_a_max_abs_diff" not in results


def test_top_k_scores_change_from_the_first_path():
    classes = ("a", "b", "c")
    labels = np.array([0, 1, 2, 0])
    exact = np.eye(3, dtype=np.float32)[labels]  # always right
    second_best = np.roll(exact, 1, axis=1) + 0.5 * exact  # the label comes second
    paths = {"keras": lambda x: exact, "other": lambda x: second_best}
    scores = top_k_scores(paths, None, [classes[i] for i in labels], classes)
    assert scores["engine_keras_top1"] == 100 and scores["engine_keras_top1_change"] == 0
    assert scores["engine_other_top1"] == 0 and scores["engine_other_top1_change"] == -100
    assert scores["engine_other_top3"] == 100 and scores["engine_other_top3_change"] == 0


@pytest.mark.slow
def test_every_engine_computes_the_classifier_and_is_scored_on_val(
    painting_folder, tmp_path, tiny_bundle
):
    """ONNX Runtime and OpenVINO in float32 compute Keras's function; bfloat16 and int8
    round it; every one is timed in the same turns and scored on the same paintings."""
    for extra in ("onnxruntime", "tf2onnx", "openvino", "nncf"):
        pytest.importorskip(extra, reason="the [engines] and [onnx] extras")
    args = parse_args([f"--output={tmp_path / 'x.json'}", f"--data={painting_folder}",
                       f"--model={tiny_bundle}", "--batch_size=2", "--raw_batches=1",
                       "--engine_rounds=1", "--calibration_images=4"])  # fmt: skip
    bundle = ModelBundle.load(tiny_bundle)
    uris = sample_catalog(painting_folder, 2)["uri"].tolist()
    results = measure_engines(bundle, args, uris)
    assert results["engine_calibration_images"] == 4 and results["engine_val_images"] == 6
    names = ["keras_float32", "onnxruntime_float32", "openvino_float32", "openvino_int8"]
    for name in names:
        assert results[f"engine_{name}_images_per_s"] > 0
        assert 0 <= results[f"engine_{name}_top1"] <= 100
    for exact in ("onnxruntime_float32", "openvino_float32"):
        assert results[f"engine_{exact}_max_abs_diff"] < 1e-4
        assert results[f"engine_{exact}_top3_change"] == 0
    assert 0 < results["engine_openvino_int8_max_abs_diff"] < 0.5


def test_an_engine_not_installed_is_named_with_its_extra_not_fatal(monkeypatch):
    """OpenVINO comes with artstyle; ONNX Runtime and NNCF's int8 are the extra."""
    for module in ("onnxruntime", "nncf"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    paths, missing = engine_paths(model, 2, np.zeros((2, 4, 4, 3)), "unused")
    assert "openvino_float32" in paths
    if "openvino_bfloat16" in paths:  # no style head to keep in float32 in this model
        assert "style_head" in missing["openvino_bfloat16_head_float32"]
    assert missing["onnxruntime_float32"] == missing["openvino_int8"] == INSTALL_HINT
    assert "pip install -e '.[engines]'" in INSTALL_HINT


@pytest.fixture
def painting_folder(tmp_path):
    """The layout of ../shared/wikiart16: catalog.csv with uri and style, images beside it."""
    rows = []
    for style in CLASSES:
        for i in range(4):
            path = painting(tmp_path / "images" / style / f"{i}.jpg", COLOURS[style], seed=i)
            split = "val" if i % 2 else "train"
            rows.append({"uri": str(path.relative_to(tmp_path)), "style": style, "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "catalog.csv", index=False)
    return tmp_path


@pytest.mark.slow
def test_a_whole_run_writes_every_figure_the_readme_names(painting_folder, tmp_path, tiny_bundle):
    output = tmp_path / "bench.json"
    argv = [f"--output={output}", f"--data={painting_folder}", f"--model={tiny_bundle}",
            "--images=12", "--large_images=16", "--batch_size=4", "--reload_images=2",
            "--decode_images=4", "--raw_batches=1", "--startup_runs=3",
            "--skip_fetch", "--skip_engines"]  # fmt: skip
    results = bench(argv)

    assert json.loads(output.read_text()) == results
    assert results["model"] == "tiny-test-model"
    assert results["precision"] in ("float32", "bfloat16")  # the pipeline's, resolved here
    assert results["precision_reason"]  # and why
    assert results["pipeline_images"] == 12 and results["pipeline_errors"] == 0
    assert results["pipeline_default_engine"] == results["startup_default_engine"] == "openvino"
    assert results["pipeline_default_precision"] in ("float32", "bfloat16")
    assert results["large_images"] == 16 and results["large_errors"] == 0
    assert results["decode_images"] == 4 and results["reload_images"] == 2
    assert results["startup_runs_s"] == sorted(results["startup_runs_s"])
    assert results["startup_run_s"] == results["startup_runs_s"][1]  # the median of three
    assert results["startup_floor_s"] == results["startup_floor_runs_s"][1]
    assert results["help_s"] == results["help_runs_s"][1]
    assert 0 < results["startup_floor_s"] < results["startup_run_s"]
    assert results["startup_openvino_runs_s"] == sorted(results["startup_openvino_runs_s"])
    assert results["startup_openvino_run_s"] == results["startup_openvino_runs_s"][1]
    assert results["startup_openvino_floor_s"] == results["startup_openvino_floor_runs_s"][1]
    # The first OpenVINO run converts the model, in TensorFlow; the others read it.
    assert results["openvino_conversion_run_s"] > results["startup_openvino_run_s"]
    assert results["raw_images_per_s"] == pytest.approx(
        (results["raw_images_per_s_before"] + results["raw_images_per_s_after"]) / 2
    )
    for key in ("raw_images_per_s_before", "raw_images_per_s_after", "decode_images_per_s",
                "decode_images_per_s_per_core", "raw_cpu_ms_per_image",
                "reload_images_per_s", "pipeline_images_per_s_with_startup", "peak_rss_mb",
                "help_s", "peak_rss_mb_startup_openvino", "peak_rss_mb_default",
                "pipeline_default_images_per_s_with_startup", "peak_rss_mb_large"):  # fmt: skip
        assert results[key] > 0, key
    # Twelve images may not take measurably longer than four: then the rates are None.
    for key in ("pipeline_images_per_s", "startup_s", "pipeline_vs_raw",
                "per_image_reload_vs_pipeline", "pipeline_cpu_ms_per_image",
                "raw_cpu_share_of_pipeline", "pipeline_default_images_per_s"):  # fmt: skip
        assert results[key] is None or results[key] > 0, key
    # The engines were skipped: the default engine's model alone was not timed.
    assert results["pipeline_default_vs_its_model_alone"] is None


def test_peak_memory_is_the_childs_own_not_this_process(tmp_path):
    """This test process holds TensorFlow (over 300 MB); the child holds about 200 MB."""
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 > 300
    allocate = "import time; block = b'x' * (200 << 20); time.sleep(0.5)"
    run = run_process([sys.executable, "-c", allocate], tmp_path / "child.log")
    assert 200 < run.peak_rss_mb < 300
    assert run.wall_s > 0.5
    assert 0 < run.cpu_s < run.wall_s  # it mostly slept


def test_a_childs_cpu_time_counts_all_its_threads(tmp_path):
    spin = (
        "import threading, time\n"
        "def spin():\n"
        "    end = time.thread_time() + 0.3\n"
        "    while time.thread_time() < end: pass\n"
        "threads = [threading.Thread(target=spin) for _ in range(2)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
    )
    run = run_process([sys.executable, "-c", spin], tmp_path / "child.log")
    assert run.cpu_s >= 0.6


def test_the_latency_server_serves_its_folder_late_and_nothing_outside_it(tmp_path):
    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "root" / "a" / "b.jpg").write_bytes(b"painting")
    (tmp_path / "secret.txt").write_text("not served")
    with latency_server((tmp_path / "root").resolve(), latency_s=0.3) as server:
        started = time.monotonic()
        with urllib.request.urlopen(f"{server.url}/a/b.jpg") as response:
            assert response.read() == b"painting"
        assert time.monotonic() - started >= 0.3
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{server.url}/../secret.txt")
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{server.url}/a/%2E%2E/%2E%2E/secret.txt")
    assert server.most_in_flight == 1


def test_the_latency_server_throttles_the_first_request_for_the_paths_it_is_told(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"painting")
    with latency_server(tmp_path.resolve(), latency_s=0, throttled=["a.jpg"]) as server:
        with pytest.raises(urllib.error.HTTPError, match="503") as refused:
            urllib.request.urlopen(f"{server.url}/a.jpg")
        assert refused.value.headers["Retry-After"] == "1"
        with urllib.request.urlopen(f"{server.url}/a.jpg") as response:
            assert response.read() == b"painting"


@pytest.mark.slow
def test_the_fetch_section_reads_the_same_paintings_over_http(
    painting_folder, tmp_path, tiny_bundle
):
    output = tmp_path / "bench.json"
    argv = [f"--output={output}", f"--data={painting_folder}", f"--model={tiny_bundle}",
            "--images=12", "--skip_large", "--batch_size=4", "--reload_images=1",
            "--decode_images=2", "--raw_batches=1", "--startup_runs=1",
            "--fetch_images=12", "--fetch_small_catalogs", "5", "--fetch_rounds=2",
            "--fetch_concurrency=3"]  # fmt: skip
    results = bench(argv)
    assert results["fetch_images"] == 12
    # the runs and the start-up their rates leave out are the default engine's
    assert results["fetch_engine"] == results["startup_default_engine"] == "openvino"
    for source in ("http_50ms", "http_200ms", "http_200ms_faults"):
        assert results[f"fetch_{source}_errors"] == 0  # the faults were retried
        assert results[f"fetch_{source}_peak_rss_mb"] > 0
    assert results["fetch_5_rows_images"] == 5
    for source in ("disk", "http", "http_faults"):
        assert len(results[f"fetch_5_rows_{source}_runs_s"]) == 2
        assert results[f"fetch_5_rows_{source}_errors"] == 0
        if source != "disk":
            assert results[f"fetch_5_rows_{source}_vs_disk"] > 0
    assert 1 <= results["fetch_most_in_flight"] <= 3  # the per-host cap held
