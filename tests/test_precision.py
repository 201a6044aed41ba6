import json
import logging
from types import SimpleNamespace

import keras
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.options.pipeline_options import PipelineOptions

from models import precision
from models.bundle import ModelBundle, load_classifier
from models.cache import CACHE_DIR_VARIABLE
from models.precision import (
    PrecisionCache,
    building_in,
    cpu_bfloat16_flag,
    machine_key,
    measured_speedup,
    resolve_precision,
)
from pipeline.plan import plan_run
from pipeline.predict import run
from tests.conftest import painting


@pytest.fixture
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def cpu(monkeypatch):
    """Sets the bfloat16 flag this machine reports, on a machine without a GPU."""
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    return lambda flag: monkeypatch.setattr(precision, "cpu_bfloat16_flag", lambda: flag)


def never_measured() -> float:
    raise AssertionError("measured where a rule decides")


def test_bfloat16_is_native_only_where_the_cpu_has_the_instructions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_bfloat16_flag(str(cpuinfo)) is None
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_bfloat16_flag(str(cpuinfo)) == "avx512_bf16"
    cpuinfo.write_text("flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n")
    assert cpu_bfloat16_flag(str(cpuinfo)) == "amx_bf16"
    assert cpu_bfloat16_flag(str(tmp_path / "no-such-file")) is None


def test_auto_follows_the_rule_where_the_hardware_leaves_no_doubt(cpu, monkeypatch):
    cpu(None)
    assert resolve_precision("auto", never_measured).precision == "float32"
    cpu("amx_bf16")
    assert str(resolve_precision("auto", never_measured)) == "bfloat16 chosen: this CPU has AMX"
    cpu(None)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"])
    assert resolve_precision("auto", never_measured).precision == "bfloat16"


def test_an_asked_precision_is_kept_and_an_unknown_one_refused():
    choice = resolve_precision("float32", never_measured)
    assert choice.to_json() == {"precision": "float32", "reason": "asked for (--precision float32)"}
    assert resolve_precision("bfloat16", never_measured).precision == "bfloat16"
    with pytest.raises(ValueError, match="Unknown precision 'float16'"):
        resolve_precision("float16")


@pytest.mark.parametrize(
    "speedup, chosen, reason",
    [
        (1.7, "bfloat16", "1.70 x float32 measured on this CPU"),
        (0.68, "float32", "bfloat16 measured at 0.68 x float32 on this CPU"),
        (1.08, "float32", "bfloat16 measured at 1.08 x float32 on this CPU"),  # not worth it
    ],
)
def test_avx512_bf16_without_amx_is_decided_by_measurement(
    cpu, cache_folder, speedup, chosen, reason
):
    cpu("avx512_bf16")
    choice = resolve_precision("auto", lambda: speedup, "model-a")
    assert (choice.precision, choice.reason) == (chosen, reason)


def test_without_a_measurement_avx512_bf16_alone_keeps_float32(cpu):
    cpu("avx512_bf16")
    assert resolve_precision("auto").precision == "float32"


def test_a_measurement_is_made_once_per_machine_and_model(cpu, cache_folder):
    cpu("avx512_bf16")
    measurements = []

    def measure() -> float:
        measurements.append(1)
        return 1.4

    for model_id in ("model-a", "model-a", "model-b", "model-a"):
        assert resolve_precision("auto", measure, model_id).precision == "bfloat16"
    assert len(measurements) == 2
    entries = json.loads((cache_folder / "precision.json").read_text())
    assert entries[machine_key("model-a")]["speedup"] == 1.4
    assert {entry["model"] for entry in entries.values()} == {"model-a", "model-b"}


def test_the_key_changes_with_the_cpu_and_the_model(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Xeon A\nflags\t\t: avx512_bf16\n")
    key = machine_key("m", str(cpuinfo))
    assert machine_key("other", str(cpuinfo)) != key
    cpuinfo.write_text("model name\t: EPYC B\nflags\t\t: avx512_bf16\n")
    assert machine_key("m", str(cpuinfo)) != key


def test_a_cache_that_cannot_be_written_or_read_costs_a_measurement_not_the_run(tmp_path, caplog):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    cache = PrecisionCache(not_a_folder / "precision.json")
    with caplog.at_level(logging.WARNING):
        assert cache.speedup("m", lambda: 0.9) == 0.9
    assert "cannot cache the precision measurement" in caplog.text
    garbled = tmp_path / "precision.json"
    garbled.write_text("{not json")
    assert PrecisionCache(garbled).speedup("m", lambda: 1.3) == 1.3
    assert PrecisionCache(garbled).speedup("m", never_measured) == 1.3  # and mended


def test_the_speedup_is_each_precisions_fastest_batch_after_a_warm_up(monkeypatch):
    clock = SimpleNamespace(now=0.0)
    # Seconds per batch: the warm-up (tracing) is slow, and one float32 batch is slowed by
    # another process; neither counts.
    costs = {"float32": iter([9.0, 2.0, 5.0, 2.0]), "bfloat16": iter([9.0, 1.0, 1.0, 1.0])}

    class FakeModel:
        def __init__(self, precision: str):
            self.precision = precision
            self.input = SimpleNamespace(shape=(None, 4, 4, 3))

        def predict_on_batch(self, images):
            assert images.shape == (8, 4, 4, 3)
            clock.now += next(costs[self.precision])

    monkeypatch.setattr(precision.time, "perf_counter", lambda: clock.now)
    assert measured_speedup(FakeModel, batch_size=8, rounds=3) == 2.0


def test_building_in_bfloat16_leaves_keras_float32_after():
    with building_in("bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"


def test_auto_must_be_resolved_before_a_model_is_built(tiny_bundle):
    """One way to resolve 'auto' (load_classifier's, which measures where it must)."""
    with pytest.raises(ValueError, match="not 'auto'"):
        ModelBundle.load(tiny_bundle).classifier(precision="auto")
    assert keras.config.dtype_policy().name == "float32"


def test_a_bfloat16_classifier_rounds_the_backbone_only(tiny_bundle):
    bundle = ModelBundle.load(tiny_bundle)
    exact, rounded = bundle.classifier(), bundle.classifier(precision="bfloat16")
    assert rounded.get_layer("efficientnet_lite0_pooled").dtype_policy.name == "mixed_bfloat16"
    assert rounded.get_layer("style_head").dtype_policy.name == "float32"
    images = np.random.default_rng(2).uniform(0, 255, (4, 224, 224, 3)).astype(np.float32)
    probabilities = np.asarray(rounded.predict_on_batch(images))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, exact.predict_on_batch(images), atol=0.05)
    assert not np.array_equal(probabilities, exact.predict_on_batch(images))


def test_the_loaded_classifier_computes_in_the_measured_choice_and_logs_why(
    tiny_bundle, cpu, cache_folder, monkeypatch, caplog
):
    cpu("avx512_bf16")
    monkeypatch.setattr(precision, "measured_speedup", lambda build: 1.7)
    with caplog.at_level(logging.INFO):
        classifier = load_classifier(tiny_bundle, precision="auto")
    assert "bfloat16 chosen: 1.70 x float32 measured on this CPU (--precision=auto)" in caplog.text
    images = np.random.default_rng(3).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    rounded = ModelBundle.load(tiny_bundle).classifier(precision="bfloat16")
    np.testing.assert_array_equal(
        classifier.predict_on_batch(images), np.asarray(rounded.predict_on_batch(images))
    )


def test_a_measured_choice_returns_the_classifier_it_measured_not_a_third_build(
    tiny_bundle, cpu, cache_folder, monkeypatch
):
    cpu("avx512_bf16")
    built = []
    build = ModelBundle.classifier

    def counting(self, backbone_weights=None, precision="float32", embeddings=False):
        built.append(precision)
        return build(self, backbone_weights, precision, embeddings)

    monkeypatch.setattr(ModelBundle, "classifier", counting)
    load_classifier(tiny_bundle, precision="auto")
    assert sorted(built) == ["bfloat16", "float32"]


def test_summary_json_says_which_arithmetic_the_run_used_and_why(
    tiny_bundle, cpu, cache_folder, monkeypatch, tmp_path
):
    cpu("avx512_bf16")
    monkeypatch.setattr(precision, "measured_speedup", lambda build: 0.68)
    images = [painting(tmp_path / f"p{i}.png", (200, 40, 30), seed=i) for i in range(2)]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("uri\n" + "".join(f"{path}\n" for path in images))
    argv = [f"--input={catalog}", f"--model={tiny_bundle}", "--batch_size=2", "--engine=keras"]
    summary = run([*argv, f"--output={tmp_path / 'auto'}"])
    assert summary.precision.to_json() == {
        "precision": "float32",
        "reason": "bfloat16 measured at 0.68 x float32 on this CPU",
    }
    summary = run([*argv, f"--output={tmp_path / 'asked'}", "--precision=bfloat16"])
    assert summary.precision.precision == "bfloat16"


def test_on_a_remote_runner_the_summary_says_each_worker_resolves_its_own(tiny_bundle):
    options = PipelineOptions(["--runner=DataflowRunner", "--precision=auto"])
    plan = plan_run(options, ModelBundle.load(tiny_bundle))
    assert plan.precision.to_json() == {
        "precision": "auto",
        "reason": "resolved per worker (see the workers' logs)",
    }
