"""`python -m pipeline --embeddings`: one embedding per predicted row, from the same pass as
its prediction, in embeddings-*.parquet beside the predictions; on both engines."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from models.bundle import BundleError, ModelBundle
from models.cache import CACHE_DIR_VARIABLE
from models.vector_index import VectorIndex
from pipeline.index import run as index
from pipeline.predict import embeddings_schema, run
from tests.conftest import CLASSES, COLOURS, EMBEDDING_DIMENSION, painting
from transforms.catalog import open_catalog
from transforms.embeddings import EmbeddingsOrigin, open_run_embeddings
from transforms.fetch import read_file
from transforms.images import decode_image

GOOD = [f"images/{style}-{i}.jpg" for style in CLASSES for i in range(2)]
BAD = ["images/missing.jpg", "images/text.jpg"]


@pytest.fixture
def catalog(tmp_path):
    for i, uri in enumerate(GOOD):
        painting(tmp_path / uri, COLOURS[uri.split("/")[1].split("-")[0]], seed=i)
    (tmp_path / "images/text.jpg").write_text("not a painting")
    uris = GOOD + BAD
    pd.DataFrame(
        {"uri": uris, "style": [u.split("/")[1].split("-")[0] for u in uris],
         "title": [f"Painting {i}" for i in range(len(uris))]}
    ).to_csv(tmp_path / "catalog.csv", index=False)  # fmt: skip
    return tmp_path / "catalog.csv"


def argv_for(catalog, output, bundle, *extra):
    return [f"--input={catalog}", f"--output={output}", f"--model={bundle}", "--batch_size=4",
            *extra]  # fmt: skip


def embeddings_of(output) -> pd.DataFrame:
    frame = pq.read_table([str(p) for p in output.glob("embeddings-*.parquet")]).to_pandas()
    return frame.sort_values("uri").reset_index(drop=True)


def predictions_of(output) -> pd.DataFrame:
    frame = pq.read_table([str(p) for p in output.glob("predictions-*.parquet")]).to_pandas()
    return frame.sort_values("uri").reset_index(drop=True)


def keras_embeddings(bundle_path: str, folder, uris) -> np.ndarray:
    bundle = ModelBundle.load(bundle_path)
    images = np.stack([decode_image(read_file(str(folder / u)), size=224) for u in uris])
    return bundle.classifier(embeddings=True).predict_on_batch(images)[1]


def test_a_run_writes_one_embedding_per_predicted_row_beside_the_predictions(
    catalog, tmp_path, projection_bundle, monkeypatch
):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    output = tmp_path / "out"
    exact = "--precision=float32"  # to compare with Keras's float32 below
    summary = run(argv_for(catalog, output, projection_bundle, exact, "--embeddings"))
    assert summary.engine is not None
    assert summary.engine.engine == "openvino"  # the default engine on a CPU

    bundle = ModelBundle.load(projection_bundle)
    table = pq.read_table([str(p) for p in output.glob("embeddings-*.parquet")])
    assert table.schema == embeddings_schema(open_catalog(str(catalog)), bundle)
    run_embeddings = open_run_embeddings(str(output))
    assert run_embeddings.origin == EmbeddingsOrigin(bundle.id, bundle.manifest.embedding)
    assert run_embeddings.n_rows == len(GOOD)  # error rows have none

    embeddings = embeddings_of(output)
    predictions = predictions_of(output)
    predicted = predictions[predictions["error"].isna()].reset_index(drop=True)
    assert embeddings["uri"].tolist() == predicted["uri"].tolist() == sorted(GOOD)
    for column in ("title", "label", "style", "confidence"):
        assert embeddings[column].tolist() == predicted[column].tolist()
    vectors = np.stack(embeddings["embedding"].to_numpy()).astype(np.float32)
    assert vectors.shape == (len(GOOD), EMBEDDING_DIMENSION)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)  # float16
    expected = keras_embeddings(projection_bundle, tmp_path, embeddings["uri"])
    np.testing.assert_allclose(vectors, expected, atol=2e-3)

    plain = run(argv_for(catalog, tmp_path / "plain", projection_bundle, exact))
    assert not list((tmp_path / "plain").glob("embeddings-*"))
    np.testing.assert_allclose(
        np.stack(predictions_of(tmp_path / "plain")["top_k_probabilities"].dropna().to_numpy()),
        np.stack(predictions["top_k_probabilities"].dropna().to_numpy()),
        atol=1e-6,
    )
    assert plain.n_images == summary.n_images == len(GOOD) + len(BAD)


def test_keras_writes_the_embeddings_openvino_does_and_an_index_takes_them(
    catalog, tmp_path, projection_bundle, monkeypatch
):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    for engine in ("keras", "openvino"):
        flags = (f"--engine={engine}", "--precision=float32", "--embeddings")
        run(argv_for(catalog, tmp_path / engine, projection_bundle, *flags))
    on_keras, on_openvino = (embeddings_of(tmp_path / name) for name in ("keras", "openvino"))
    assert on_keras["uri"].tolist() == on_openvino["uri"].tolist()
    np.testing.assert_allclose(
        np.stack(on_keras["embedding"].to_numpy()).astype(np.float32),
        np.stack(on_openvino["embedding"].to_numpy()).astype(np.float32),
        atol=2e-3,
    )

    built = index([str(tmp_path / "keras"), f"--output={tmp_path / 'index'}"])
    assert built.size == len(GOOD)
    loaded = VectorIndex.load(str(tmp_path / "index"))
    (nearest,) = loaded.search(loaded.vectors(np.array([3])), k=1)
    assert nearest.ids.tolist() == [3] and nearest.distances[0] < 1e-3
    assert set(loaded.items.column("title").to_pylist()) <= {f"Painting {i}" for i in range(8)}


def test_a_later_run_without_embeddings_takes_the_earlier_ones_away(
    catalog, tmp_path, projection_bundle
):
    """Embeddings are a run's results: an earlier run's would no longer match the
    predictions beside them."""
    output = tmp_path / "out"
    run(argv_for(catalog, output, projection_bundle, "--embeddings"))
    assert list(output.glob("embeddings-*.parquet"))
    run(argv_for(catalog, output, projection_bundle))
    assert not list(output.glob("embeddings-*.parquet"))


def test_embeddings_of_a_model_without_a_projection_stop_the_run_at_start_up(
    catalog, tmp_path, tiny_bundle
):
    with pytest.raises(BundleError, match="gives no embeddings"):
        run(argv_for(catalog, tmp_path / "out", tiny_bundle, "--embeddings"))
    assert not (tmp_path / "out").exists()
    cli = subprocess.run(
        [sys.executable, "-m", "pipeline",
         *argv_for(catalog, tmp_path / "out", tiny_bundle, "--embeddings")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert cli.returncode == 2
    assert cli.stderr.strip().count("\n") == 0 and "--projection" in cli.stderr
