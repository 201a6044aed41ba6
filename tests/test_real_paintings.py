"""The shipped model on real WikiArt paintings (`python -m pytest -m slow`).

Needs ../shared/wikiart16 beside the repository (see README); skipped where it is absent.
"""

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from models.bundle import DEFAULT_BUNDLE, ModelBundle
from pipeline.predict import run as predict

WIKIART16 = Path(__file__).resolve().parents[2] / "shared" / "wikiart16"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WIKIART16.is_dir(), reason="../shared/wikiart16 is not here"),
]


@pytest.fixture(scope="module")
def val_sample(tmp_path_factory) -> Path:
    """Four `val` paintings of every style, with absolute URIs."""
    catalog = pd.read_csv(WIKIART16 / "catalog.csv", dtype=str, keep_default_na=False)
    val = catalog[catalog["split"] == "val"]
    sample = val.groupby("style").head(4).copy()
    sample["uri"] = [str(WIKIART16 / uri) for uri in sample["uri"]]
    path = tmp_path_factory.mktemp("real") / "val_sample.csv"
    sample.to_csv(path, index=False)
    return path


def test_the_shipped_model_tells_styles_apart_on_real_paintings(val_sample, tmp_path):
    summary = predict([f"--input={val_sample}", f"--output={tmp_path}"])
    bundle = ModelBundle.load(DEFAULT_BUNDLE)

    assert summary.model_id == bundle.id
    assert summary.n_images == 64 and summary.n_errors == 0
    assert summary.n_labelled == 64
    # Chance is 1/16; the bundle's manifest reports about two thirds on the whole split.
    assert summary.top1 >= 0.45
    assert summary.top3 >= 0.7
    predictions = pq.read_table(list(tmp_path.glob("predictions-*.parquet"))).to_pandas()
    assert set(predictions["style"]) <= set(bundle.classes)
    assert predictions["confidence"].between(0, 1).all()
