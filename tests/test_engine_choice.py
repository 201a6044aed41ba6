"""`--engine auto`: OpenVINO on this machine's CPU, Keras on a GPU and on other machines."""

import logging
import subprocess
import sys

import pytest

from models import engine_choice, openvino_engine, precision
from models.cache import CACHE_DIR_VARIABLE
from models.engine_choice import choose_engine, gpu_device_present
from pipeline import plan
from pipeline.predict import run
from tests.conftest import painting


@pytest.fixture
def gpu(monkeypatch):
    """Sets whether this machine has a GPU."""
    return lambda present: monkeypatch.setattr(engine_choice, "gpu_device_present", lambda: present)


def test_an_asked_engine_is_kept(gpu):
    gpu(True)
    choice = choose_engine("openvino", on_this_machine=False)
    assert choice.to_json() == {"engine": "openvino", "reason": "asked for (--engine openvino)"}
    gpu(False)
    assert choose_engine("keras", on_this_machine=True).engine == "keras"


def test_openvino_on_this_machines_cpu_keras_elsewhere(gpu):
    gpu(False)
    assert choose_engine("auto", on_this_machine=True).engine == "openvino"
    assert choose_engine("auto", on_this_machine=False).to_json() == {
        "engine": "keras",
        "reason": "the model runs on other machines, which may have GPUs",
    }
    gpu(True)
    assert str(choose_engine("auto", on_this_machine=True)) == "keras chosen: a GPU is here"


def test_a_gpu_is_seen_by_its_device_files(tmp_path):
    assert not gpu_device_present(str(tmp_path))
    (tmp_path / "nvidiactl").touch()
    assert not gpu_device_present(str(tmp_path))
    (tmp_path / "nvidia0").touch()
    assert gpu_device_present(str(tmp_path))


def test_the_choice_loads_no_tensorflow():
    script = (
        "import sys; from models.engine_choice import choose_engine; "
        "print(choose_engine('auto', True).engine, "
        "[name for name in ('tensorflow', 'keras') if name in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(" ", 1)[1].strip() == "[]"


def test_a_run_says_which_engine_it_chose_and_why_having_asked_once(
    tiny_bundle, gpu, tmp_path, monkeypatch
):
    """The plan is resolved once: the model's check, the graph and summary.json read it."""
    gpu(False)
    asked = []
    monkeypatch.setattr(
        plan, "choose_engine", lambda *args: asked.append(args) or choose_engine(*args)
    )
    images = [painting(tmp_path / f"p{i}.png", (200, 40, 30), seed=i) for i in range(3)]
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("uri\n" + "".join(f"{path}\n" for path in images))
    argv = [f"--input={catalog}", f"--model={tiny_bundle}", "--batch_size=2"]
    summary = run([*argv, f"--output={tmp_path / 'out'}", "--precision=float32"])
    assert summary.engine.to_json() == {
        "engine": "openvino",
        "reason": "on this CPU it computes Keras's results without TensorFlow's start-up",
    }
    assert summary.n_images == 3 and summary.n_errors == 0
    assert asked == [("auto", True)]


def test_summary_json_gives_the_precision_openvino_ran_in(tiny_bundle, gpu, tmp_path, monkeypatch):
    gpu(False)
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))  # nothing measured yet
    monkeypatch.setattr(precision, "cpu_bfloat16_flag", lambda: "avx512_bf16")
    monkeypatch.setattr(openvino_engine, "measured_speedup", lambda *args, **kwargs: 1.7)
    image = painting(tmp_path / "p.png", (200, 40, 30), seed=0)
    (tmp_path / "catalog.csv").write_text(f"uri\n{image}\n")
    summary = run([f"--input={tmp_path / 'catalog.csv'}", f"--output={tmp_path / 'out'}",
                   f"--model={tiny_bundle}", "--batch_size=2"])  # fmt: skip
    assert summary.engine.engine == "openvino"
    assert summary.precision.to_json() == {
        "precision": "bfloat16",
        "reason": "1.70 x float32 measured on this CPU",
    }


def test_the_model_runs_in_the_precision_resolved_at_start_even_where_none_is_kept(
    tiny_bundle, tmp_path, monkeypatch, caplog
):
    """Where the cache cannot be written, each resolution of `auto` measures afresh, and two
    timings on a shared machine may disagree: the run resolves once, and its workers run
    what summary.json says."""
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "not-a-folder"))
    monkeypatch.setattr(precision, "cpu_bfloat16_flag", lambda: "avx512_bf16")
    timings = iter([1.7, 0.9])
    monkeypatch.setattr(precision, "measured_speedup", lambda *args, **kwargs: next(timings))
    image = painting(tmp_path / "p.png", (200, 40, 30), seed=0)
    (tmp_path / "catalog.csv").write_text(f"uri\n{image}\n")
    with caplog.at_level(logging.INFO):
        summary = run([f"--input={tmp_path / 'catalog.csv'}", f"--output={tmp_path / 'out'}",
                       f"--model={tiny_bundle}", "--batch_size=2", "--engine=keras"])  # fmt: skip
    assert summary.precision.precision == "bfloat16"
    loaded = [r.getMessage() for r in caplog.records if "(--precision=" in r.getMessage()]
    assert loaded and all("bfloat16 chosen" in line for line in loaded), loaded
