"""`--engine auto`: OpenVINO where Keras would gain nothing from TensorFlow's start-up."""

import subprocess
import sys

import pytest

from models import engine_choice, precision
from models.engine_choice import choose_engine
from models.precision import PrecisionCache, gpu_device_present
from models.settings import SMALL_CATALOG
from pipeline.predict import run
from tests.conftest import painting

SMALL, BIG = SMALL_CATALOG - 1, SMALL_CATALOG + 1


@pytest.fixture
def machine(monkeypatch):
    """Sets this machine's bfloat16 CPU flag and whether it has a GPU."""

    def set_machine(flag: str | None, gpu: bool = False) -> None:
        monkeypatch.setattr(precision, "cpu_bfloat16_flag", lambda: flag)
        for module in (precision, engine_choice):
            monkeypatch.setattr(module, "gpu_device_present", lambda: gpu)

    return set_machine


def engine(images: int | None, precision: str = "auto", model_id: str = "m") -> str:
    return choose_engine("auto", precision, model_id, images, in_this_process=True).engine


def test_an_asked_engine_is_kept(machine):
    machine(None, gpu=True)
    choice = choose_engine("openvino", "auto", "m", None, in_this_process=False)
    assert choice.to_json() == {"engine": "openvino", "reason": "asked for (--engine openvino)"}
    assert choose_engine("keras", "float32", "m", 1, in_this_process=True).engine == "keras"


def test_where_keras_computes_in_float32_openvino_runs_any_catalog(machine):
    machine(None)  # no bfloat16 instructions
    assert engine(None) == engine(BIG) == "openvino"
    machine("amx_bf16")
    assert engine(None, precision="float32") == "openvino"
    choice = choose_engine("auto", "float32", "m", SMALL, in_this_process=False)
    assert choice.to_json() == {
        "engine": "keras",
        "reason": "the model runs in worker processes, or on other machines",
    }


def test_where_bfloat16_pays_keras_runs_big_catalogs_and_openvino_small_ones(machine):
    machine("amx_bf16")
    assert engine(SMALL) == "openvino"
    assert engine(BIG) == engine(None) == "keras"
    assert engine(SMALL, precision="bfloat16") == "keras"  # OpenVINO's rounds more
    machine(None, gpu=True)
    assert engine(SMALL) == engine(SMALL, precision="float32") == "keras"


def test_avx512_bf16_alone_follows_the_cached_measurement(machine):
    machine("avx512_bf16")
    reason = choose_engine("auto", "auto", "new", BIG, in_this_process=True).reason
    assert reason == f"{SMALL_CATALOG}+ images, and bfloat16's speed here still to measure"
    assert engine(SMALL, model_id="new") == "openvino"

    PrecisionCache().speedup("slower", lambda: 0.68)
    PrecisionCache().speedup("faster", lambda: 1.7)
    assert engine(BIG, model_id="slower") == "openvino"
    assert engine(BIG, model_id="faster") == "keras"
    assert engine(SMALL, model_id="faster") == "openvino"


def test_a_gpu_is_seen_by_its_device_files(tmp_path):
    assert not gpu_device_present(str(tmp_path))
    (tmp_path / "nvidiactl").touch()
    assert not gpu_device_present(str(tmp_path))
    (tmp_path / "nvidia0").touch()
    assert gpu_device_present(str(tmp_path))


def test_the_choice_loads_no_tensorflow():
    script = (
        "import sys; from models.engine_choice import choose_engine; "
        "print(choose_engine('auto', 'auto', 'm', 3, True).engine, "
        "[name for name in ('tensorflow', 'keras') if name in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(" ", 1)[1].strip() == "[]"


def test_a_small_run_says_which_engine_it_chose_and_why(tiny_bundle, machine, tmp_path):
    machine("amx_bf16")
    images = [painting(tmp_path / f"p{i}.png", (200, 40, 30), seed=i) for i in range(3)]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("uri\n" + "".join(f"{path}\n" for path in images))
    argv = [f"--input={catalog}", f"--model={tiny_bundle}", "--batch_size=2"]
    summary = run([*argv, f"--output={tmp_path / 'out'}"])
    assert summary["engine"] == {
        "engine": "openvino",
        "reason": "3 images, too few for bfloat16 to repay TensorFlow's start-up",
    }
    assert summary["n_images"] == 3 and summary["n_errors"] == 0
