"""The OpenVINO engine: Keras's classifier converted once, cached, and run without TensorFlow."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from models import openvino_engine, precision
from models.bundle import ModelBundle
from models.cache import CACHE_DIR_VARIABLE
from models.openvino_engine import load_openvino_classifier, openvino_precision
from models.precision import PrecisionCache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    return tmp_path / "cache"


def images(n: int, size: int = 224) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_it_computes_the_keras_classifier_in_float32(cache, tiny_bundle):
    batch = images(4)
    expected = ModelBundle.load(tiny_bundle).classifier(precision="float32").predict_on_batch(batch)
    classifier = load_openvino_classifier(tiny_bundle, None, "float32", batch_size=4)
    np.testing.assert_allclose(classifier.predict_on_batch(batch), expected, atol=1e-5)


def test_the_conversion_is_cached_until_the_bundle_changes(
    cache, tiny_bundle, tmp_path, monkeypatch
):
    bundle = shutil.copytree(tiny_bundle, tmp_path / "bundle")
    load_openvino_classifier(str(bundle), None, "float32", batch_size=2)
    assert len(list((cache / "openvino").glob("*/classifier.xml"))) == 1

    def no_conversion(model):
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino_engine, "converted_model", no_conversion)
    again = load_openvino_classifier(str(bundle), None, "float32", batch_size=2)
    assert again.predict_on_batch(images(2)).shape == (2, 3)

    head = bundle / ModelBundle.load(str(bundle)).manifest.head.file
    os.utime(head, (1_000_000, 1_000_000))  # a head file replaced by another
    with pytest.raises(AssertionError, match="converted again"):
        load_openvino_classifier(str(bundle), None, "float32", batch_size=2)


def test_a_changed_vote_file_is_converted_again(cache, projection_bundle, tmp_path, monkeypatch):
    """The vote is inside the converted classifier: a bundle whose vote file is replaced
    is another classifier."""
    bundle = shutil.copytree(projection_bundle, tmp_path / "bundle")
    load_openvino_classifier(str(bundle), None, "float32", batch_size=2)

    def no_conversion(model):
        raise AssertionError("converted again")

    monkeypatch.setattr(openvino_engine, "converted_model", no_conversion)
    vote = ModelBundle.load(str(bundle)).manifest.vote
    assert vote is not None
    os.utime(bundle / vote["file"], (1_000_000, 1_000_000))
    with pytest.raises(AssertionError, match="converted again"):
        load_openvino_classifier(str(bundle), None, "float32", batch_size=2)


def test_a_cache_that_cannot_be_written_costs_a_conversion_not_the_run(
    tiny_bundle, tmp_path, monkeypatch
):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "a_file" / "cache"))
    classifier = load_openvino_classifier(tiny_bundle, None, "float32", batch_size=2)
    assert classifier.predict_on_batch(images(2)).shape == (2, 3)


def test_auto_follows_the_cpus_rule_with_openvinos_own_measurement(cache, monkeypatch):
    monkeypatch.setattr(precision, "_has_gpu", lambda: pytest.fail("OpenVINO runs on the CPU"))
    monkeypatch.setattr(precision, "cpu_bfloat16_flag", lambda: None)
    assert openvino_precision("auto").precision == "float32"
    monkeypatch.setattr(precision, "cpu_bfloat16_flag", lambda: "amx_bf16")
    assert openvino_precision("auto").precision == "bfloat16"
    monkeypatch.setattr(precision, "cpu_bfloat16_flag", lambda: "avx512_bf16")
    assert (
        openvino_precision("auto", lambda: 1.7, "m").reason == "1.70 x float32 measured on this CPU"
    )
    PrecisionCache().speedup("m", lambda: 0.5)  # Keras's, kept apart
    assert (
        openvino_precision("auto", lambda: pytest.fail("measured again"), "m").precision
        == "bfloat16"
    )
    assert openvino_precision("float32").precision == "float32"


def test_bfloat16_runs_the_head_in_float32_after_the_backbone(cache, tiny_bundle):
    """Cut at the head, the two parts in float32 compute the whole; in bfloat16 only the
    backbone is rounded, as Keras's mixed policy does."""
    import openvino

    bundle = ModelBundle.load(tiny_bundle)
    core = openvino.Core()
    model = openvino_engine.classifier_model(core, bundle, None)
    model.reshape([2, 224, 224, 3])
    batch = images(2).astype(np.float32)
    whole = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(batch)[0]
    backbone, head = openvino_engine.split_at_head(model)
    features = core.compile_model(backbone, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(batch)[0]
    parts = core.compile_model(head, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(features)[0]
    np.testing.assert_allclose(parts, whole, atol=1e-6)
    rounded = load_openvino_classifier(tiny_bundle, None, "bfloat16", batch_size=2)
    np.testing.assert_allclose(rounded.predict_on_batch(images(2)), whole, atol=0.05)


def test_a_classifier_freed_on_another_thread_leaves_ctrl_c_working(cache, tiny_bundle):
    """OpenVINO's CPU plugin gives the compiling thread a signal stack that it unmaps when
    the compiled model is freed: compiled on the main thread and freed on another, it left
    the main thread a stack that was gone, and Ctrl-C then killed the process silently."""
    script = """if True:
        import signal, sys, threading
        from models.openvino_engine import load_openvino_classifier
        held = [load_openvino_classifier(sys.argv[1], None, "float32", batch_size=2)]
        freeing = threading.Thread(target=held.clear)
        freeing.start()
        freeing.join()
        handled = []
        signal.signal(signal.SIGINT, lambda signum, frame: handled.append(signum))
        signal.raise_signal(signal.SIGINT)
        print("handled", len(handled))
    """
    done = subprocess.run(
        [sys.executable, "-c", script, tiny_bundle], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout.strip()) == (0, "handled 1"), done.stderr[-2000:]


def test_openvino_loads_without_telemetry_or_a_forked_process(tiny_bundle, tmp_path):
    """`import openvino` sent a usage event to Google Analytics from a process it forked, and
    kept a client id in ~/intel. Forked from a Beam worker while gRPC's threads held their
    locks, the child aborted ("RAW: Check ... failed: Mutex::Fer ...") on the run's stderr.
    The environment is a user's: no CI variable (the library sends nothing in CI)."""
    script = """if True:
        import os, sys
        os.register_at_fork(before=lambda: print("forked", flush=True))
        from models.openvino_engine import load_openvino_classifier
        load_openvino_classifier(sys.argv[1], None, "float32", batch_size=2)
        print("loaded")
    """
    ci_variables = ("CI", "TF_BUILD", "JENKINS_URL")
    environment = {k: v for k, v in os.environ.items() if k not in ci_variables}
    environment["HOME"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script, tiny_bundle],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert (done.returncode, done.stdout.split()) == (0, ["loaded"]), done.stderr[-2000:]
    assert not (tmp_path / "intel").exists()  # the telemetry's client id, in the user's home


def test_with_embeddings_it_gives_kerass_two_outputs_in_either_precision(cache, projection_bundle):
    """The classifier of two outputs (probabilities, embeddings) is converted apart from the
    other, under its own key; in bfloat16 the head, which gives both, runs in float32."""
    batch = images(2)
    keras_model = ModelBundle.load(projection_bundle).classifier(embeddings=True)
    probabilities, embeddings = keras_model.predict_on_batch(batch)
    exact = load_openvino_classifier(projection_bundle, None, "float32", 2, embeddings=True)
    got = exact.predict_on_batch(batch)
    assert isinstance(got, list) and len(got) == 2
    np.testing.assert_allclose(got[0], probabilities, atol=1e-5)
    np.testing.assert_allclose(got[1], embeddings, atol=1e-5)
    rounded = load_openvino_classifier(projection_bundle, None, "bfloat16", 2, embeddings=True)
    rounded_probabilities, rounded_embeddings = rounded.predict_on_batch(batch)
    assert rounded_probabilities.dtype == rounded_embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(rounded_embeddings, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(rounded_embeddings, embeddings, atol=0.05)
    plain = load_openvino_classifier(projection_bundle, None, "float32", 2)
    np.testing.assert_allclose(plain.predict_on_batch(batch), probabilities, atol=1e-5)
    assert len(list((cache / "openvino").glob("*/classifier.xml"))) == 2


def test_cut_at_the_head_the_embeddings_fingerprint_is_on_the_heads_side(cache, projection_bundle):
    """The fingerprint reads the centre-pooled map, the head the features: both are cut from
    the backbone, and the two parts in float32 compute the whole classifier of two outputs."""
    import openvino

    core = openvino.Core()
    bundle = ModelBundle.load(projection_bundle)
    model = openvino_engine.classifier_model(core, bundle, None, embeddings=True)
    model.reshape([2, 224, 224, 3])
    batch = images(2).astype(np.float32)
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    whole = core.compile_model(model, "CPU", f32)(batch)
    backbone, head = openvino_engine.split_at_head(model)
    assert [p.get_friendly_name() for p in head.get_parameters()] == [
        "features", "fingerprint_source_1"]  # fmt: skip
    cut = core.compile_model(backbone, "CPU", f32)(batch)
    parts = core.compile_model(head, "CPU", f32)([cut[0], cut[1]])
    for output in range(2):
        np.testing.assert_allclose(parts[output], whole[output], atol=1e-5)
