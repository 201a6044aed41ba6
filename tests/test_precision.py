import keras
import numpy as np
import pytest

from models import precision
from models.bundle import ModelBundle
from models.precision import building_in, cpu_bfloat16_flag, resolve_precision


def test_bfloat16_is_native_only_where_the_cpu_has_the_instructions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f\n")
    assert cpu_bfloat16_flag(str(cpuinfo)) is None
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert cpu_bfloat16_flag(str(cpuinfo)) == "avx512_bf16"
    assert cpu_bfloat16_flag(str(tmp_path / "no-such-file")) is None


def test_auto_picks_bfloat16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(precision.tf.config, "list_physical_devices", lambda kind: [])
    monkeypatch.setattr(precision, "cpu_bfloat16_flag", lambda: None)
    assert resolve_precision("auto") == "float32"
    monkeypatch.setattr(precision, "cpu_bfloat16_flag", lambda: "amx_bf16")
    assert resolve_precision("auto") == "bfloat16"
    assert resolve_precision("float32") == "float32"
    with pytest.raises(ValueError, match="Unknown precision 'float16'"):
        resolve_precision("float16")


def test_building_in_bfloat16_leaves_keras_float32_after():
    with building_in("bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
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
