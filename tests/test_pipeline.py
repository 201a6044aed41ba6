"""The prediction pipeline end to end on DirectRunner, with good and bad images."""

import json
import subprocess
import sys

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from models.bundle import ModelBundle
from models.cache import CACHE_DIR_VARIABLE
from pipeline.flags import UsageError
from pipeline.plan import plan_run
from pipeline.predict import build_graph, run
from pipeline.train import run as train
from tests.conftest import CLASSES, COLOURS, painting
from transforms.catalog import CatalogError, open_catalog
from transforms.predictions import prediction_schema

# uri -> the error kind it must give (None: it must be predicted)
EXPECTED_KIND = {
    "good_blue.jpg": None,
    "good_green.png": None,
    "good_red.jpg": None,
    "cmyk.jpg": None,
    "palette.png": None,
    "sixteen_bit.png": None,
    "rgba.png": None,
    "missing.jpg": "not_found",
    "empty.jpg": "empty",
    "truncated.jpg": "decode_failed",
    "text.jpg": "not_an_image",
    "one_pixel.png": "too_small",
    "bomb.png": "too_large",
    "nosuch://host/painting.jpg": "unsupported_scheme",
    "": "missing_uri",
}
BOMB_PIXEL_CAP = 1_000_000


def make_images(folder):
    painting(folder / "good_blue.jpg", COLOURS["Blue_Period"], 1)
    painting(folder / "good_green.png", COLOURS["Green_Period"], 2)
    painting(folder / "good_red.jpg", COLOURS["Red_Period"], 3)
    rgb = Image.open(painting(folder / "base.png", (120, 90, 60), 4))
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "sixteen_bit.png")
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    (folder / "empty.jpg").write_bytes(b"")
    good = (folder / "good_blue.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "text.jpg").write_text("this is not a painting")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "one_pixel.png")
    Image.new("1", (1100, 1000)).save(folder / "bomb.png")  # 1.1 Mpx over a 1 Mpx cap


@pytest.fixture
def catalog_csv(tmp_path):
    make_images(tmp_path / "images")
    uris = [u if "://" in u or not u else f"images/{u}" for u in EXPECTED_KIND]
    labels = ["Blue_Period", "Green_Period", "Red_Period"] + ["Cubism"] * (len(uris) - 3)
    pd.DataFrame(
        {"uri": uris, "style": labels, "note": [f"n{i}" for i in range(len(uris))]}
    ).to_csv(tmp_path / "catalog.csv", index=False)
    return tmp_path / "catalog.csv"


def argv_for(catalog, output, bundle, *extra):
    return [f"--input={catalog}", f"--output={output}", f"--model={bundle}", "--batch_size=4",
            f"--max_image_pixels={BOMB_PIXEL_CAP}", *extra]  # fmt: skip


def _kind(row):
    return None if row["error"] is None else row["error"].split(":", 1)[0]


def test_every_row_comes_out_once_with_its_error_kind(catalog_csv, tmp_path, tiny_bundle):
    argv = argv_for(catalog_csv, tmp_path / "out", tiny_bundle)
    catalog = open_catalog(str(catalog_csv))
    bundle = ModelBundle.load(tiny_bundle)
    with TestPipeline(options=PipelineOptions(argv)) as pipeline:
        plan = plan_run(pipeline.options, bundle)
        rows = build_graph(pipeline, pipeline.options, plan, catalog, bundle)
        kinds = rows | beam.Map(lambda row: (row["uri"].removeprefix("images/"), _kind(row)))
        assert_that(kinds, equal_to(list(EXPECTED_KIND.items())))


def test_run_writes_predictions_metrics_and_summary(catalog_csv, tmp_path, tiny_bundle):
    output = tmp_path / "out"
    summary = run(argv_for(catalog_csv, output, tiny_bundle))

    table = pq.read_table([str(p) for p in output.glob("predictions-*.parquet")])
    catalog = open_catalog(str(catalog_csv))
    assert table.schema.remove_metadata() == prediction_schema(catalog)
    rows = table.to_pylist()
    assert len(rows) == len(EXPECTED_KIND)
    assert sorted(r["note"] for r in rows) == sorted(f"n{i}" for i in range(len(rows)))
    for row in rows:
        if row["error"] is None:
            assert row["style"] in CLASSES and row["model"] == "tiny-test-model"
            assert row["top_k_styles"][0] == row["style"] and len(row["top_k_styles"]) == 3
            assert row["top_k_probabilities"] == sorted(row["top_k_probabilities"], reverse=True)
            assert sum(row["top_k_probabilities"]) == pytest.approx(1.0, abs=1e-4)
        else:
            assert row["style"] is None and row["top_k_probabilities"] is None
            assert len(row["error"].split(": ", 1)[1]) > 5  # a message, not only a kind

    errors = sum(kind is not None for kind in EXPECTED_KIND.values())
    assert summary.n_images == len(EXPECTED_KIND) and summary.n_errors == errors
    assert summary.model_id == "tiny-test-model"
    assert summary.n_labelled == 3 and summary.n_unknown_label == 4  # Cubism, predicted
    assert json.loads((output / "summary.json").read_text()) == summary.to_json()
    metrics = pq.read_table(list(map(str, output.glob("metrics-*.parquet")))).to_pandas()
    overall = metrics[metrics.section == "overall"].set_index("metric")["value"]
    assert overall["n_images"] == len(EXPECTED_KIND)
    assert overall["top1"] == pytest.approx(summary.top1)
    assert set(metrics.section) >= {"overall", "per_class", "confusion", "errors"}


def test_parquet_and_folder_inputs(tmp_path, tiny_bundle):
    folder = tmp_path / "paintings"
    for i, style in enumerate(CLASSES):
        painting(folder / f"{style}.jpg", COLOURS[style], i)
    pd.DataFrame({"uri": [f"paintings/{s}.jpg" for s in CLASSES], "style": CLASSES}).to_parquet(
        tmp_path / "catalog.parquet"
    )
    from_parquet = run(argv_for(tmp_path / "catalog.parquet", tmp_path / "a", tiny_bundle))
    from_folder = run(argv_for(folder, tmp_path / "b", tiny_bundle))
    assert from_parquet.n_images == from_folder.n_images == 3
    assert from_parquet.n_errors == from_folder.n_errors == 0
    assert from_parquet.n_labelled == 3 and from_folder.top1 is None


def predictions_of(output):
    frame = pq.read_table([str(p) for p in output.glob("predictions-*.parquet")]).to_pandas()
    frame = frame.sort_values("uri").reset_index(drop=True)
    return frame[["uri", "style", "error"]], np.stack(
        frame["top_k_probabilities"].dropna().to_numpy()
    )


def test_two_workers_predict_what_one_worker_does(catalog_csv, tmp_path, tiny_bundle):
    """On the default engine: its choice cannot depend on where the model runs here."""
    one = run(argv_for(catalog_csv, tmp_path / "one", tiny_bundle))
    two = run(argv_for(catalog_csv, tmp_path / "two", tiny_bundle, "--direct_num_workers=2",
                       "--direct_running_mode=multi_processing"))  # fmt: skip
    assert one.engine == two.engine and one.precision == two.precision
    (one_rows, one_probs), (two_rows, two_probs) = (
        predictions_of(tmp_path / name) for name in ("one", "two")
    )
    pd.testing.assert_frame_equal(one_rows, two_rows)
    np.testing.assert_allclose(one_probs, two_probs, atol=1e-5)


def test_openvino_predicts_what_keras_does_and_then_runs_without_tensorflow(
    catalog_csv, tmp_path, tiny_bundle, monkeypatch
):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    run(
        argv_for(
            catalog_csv, tmp_path / "keras", tiny_bundle, "--engine=keras", "--precision=float32"
        )
    )
    openvino = ("--engine=openvino", "--precision=float32")
    summary = run(argv_for(catalog_csv, tmp_path / "openvino", tiny_bundle, *openvino))
    (keras_rows, keras_probs), (openvino_rows, openvino_probs) = (
        predictions_of(tmp_path / name) for name in ("keras", "openvino")
    )
    pd.testing.assert_frame_equal(keras_rows, openvino_rows)
    np.testing.assert_allclose(keras_probs, openvino_probs, atol=1e-5)
    assert summary.engine.to_json() == {
        "engine": "openvino",
        "reason": "asked for (--engine openvino)",
    }
    assert summary.precision.precision == "float32"

    # The model converted above is in the cache: a new process never loads TensorFlow.
    script = (
        "import sys; from pipeline.predict import run; run(sys.argv[1:]); "
        "print([name for name in ('tensorflow', 'keras') if name in sys.modules])"
    )
    argv = argv_for(catalog_csv, tmp_path / "again", tiny_bundle, *openvino)
    again = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == "[]"
    assert predictions_of(tmp_path / "again")[0].equals(openvino_rows)


def test_catalog_without_uri_column_stops_at_start_with_a_clear_message(tmp_path, tiny_bundle):
    (tmp_path / "catalog.csv").write_text("path,style\na.jpg,Baroque\n")
    with pytest.raises(CatalogError, match="no column 'uri'"):
        run(argv_for(tmp_path / "catalog.csv", tmp_path / "out", tiny_bundle))
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            *argv_for(tmp_path / "catalog.csv", tmp_path / "o", tiny_bundle),
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode != 0
    assert "no column 'uri'" in cli.stderr and "--uri_column" in cli.stderr
    assert "Traceback" not in cli.stderr


@pytest.mark.parametrize("entry_point", [run, train])
def test_help_lists_the_tools_own_flags(entry_point, capsys):
    with pytest.raises(SystemExit) as stop:
        entry_point(["--help"])
    assert stop.value.code == 0
    listed = capsys.readouterr().out
    assert "--input" in listed and "--batch_size" in listed
    assert ("--top_k" in listed) == (entry_point is run)
    assert ("--hidden_units" in listed) == (entry_point is train)


def test_missing_input_and_output_is_a_clear_message():
    with pytest.raises(UsageError, match="missing --input and --output"):
        run([])
