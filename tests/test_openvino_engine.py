"""The OpenVINO engine: Keras's classifier converted once, cached, and run without TensorFlow."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from models import openvino_engine
from models.bundle import ModelBundle
from models.openvino_engine import load_openvino_classifier, openvino_precision


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ARTSTYLE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def images(n: int, size: int = 224) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_it_computes_the_keras_classifier_in_float32(cache, tiny_bundle):
    batch = images(4)
    expected = ModelBundle.load(tiny_bundle).classifier(precision="float32").predict_on_batch(batch)
    classifier = load_openvino_classifier(tiny_bundle, None, "auto", batch_size=4)
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


def test_a_cache_that_cannot_be_written_costs_a_conversion_not_the_run(
    tiny_bundle, tmp_path, monkeypatch
):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("ARTSTYLE_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    classifier = load_openvino_classifier(tiny_bundle, None, "float32", batch_size=2)
    assert classifier.predict_on_batch(images(2)).shape == (2, 3)


def test_auto_is_float32_and_bfloat16_only_when_asked():
    assert openvino_precision("auto").precision == "float32"
    assert "0.38" in openvino_precision("auto").reason
    assert openvino_precision("bfloat16").precision == "bfloat16"
    assert openvino_precision("float32").precision == "float32"


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
