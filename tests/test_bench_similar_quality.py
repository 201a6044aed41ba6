"""bench.similar_quality: its copies, its threshold rule, and one whole run on a few
paintings with a tiny model."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bench.similar_quality import (
    ALTERATIONS,
    FALSE_PAIR_TARGET,
    RECALL_TARGET,
    altered,
    main,
    make_copies,
    threshold_choice,
)
from tests.conftest import CLASSES, COLOURS, painting


def test_each_alteration_changes_the_painting_as_named():
    image = Image.new("RGB", (200, 100), (10, 120, 200))
    sizes = {name: altered(image, name, seed=1)[0].size for name in ALTERATIONS}
    assert sizes["half_size"] == (100, 50)
    assert sizes["jpeg_30"] == (200, 100) and altered(image, "jpeg_30", 1)[1]["quality"] == 30
    assert sizes["crop_10"] == (180, 90)
    rotated = sizes["rotate_3"]
    assert rotated[0] > 200 and rotated[1] > 100  # the corners, kept
    assert sizes["frame"] == (212, 112)  # 6% of the shorter side on each edge
    with pytest.raises(ValueError):
        altered(image, "sepia", seed=0)


def test_copies_are_made_once_with_a_catalog_naming_their_originals(tmp_path):
    painting(tmp_path / "data/images/a.jpg", (200, 30, 30), seed=0)
    originals = pd.DataFrame({"uri": ["images/a.jpg"], "style": ["Red"], "split": ["val"]})
    catalog = make_copies(originals, tmp_path / "data", tmp_path / "copies")
    rows = pd.read_csv(catalog)
    assert rows["alteration"].tolist() == list(ALTERATIONS)
    assert set(rows["original"]) == {"images/a.jpg"} and set(rows["split"]) == {"copy"}
    assert all((tmp_path / "copies" / uri).is_file() for uri in rows["uri"])
    catalog.write_text("kept")
    assert make_copies(originals, tmp_path / "data", tmp_path / "copies").read_text() == "kept"


def test_the_threshold_lists_the_copies_and_keeps_distinct_pairs_under_their_share():
    rng = np.random.default_rng(0)
    copies = rng.uniform(0.0, 0.05, 1000)
    distinct = rng.uniform(0.2, 1.0, 100_000)
    choice = threshold_choice(copies, distinct, ["frame"] * 1000)
    assert choice["needed_for_recall"] <= choice["chosen"] <= choice["allowed_by_false_pairs"]
    assert choice["recall_at_chosen"] >= RECALL_TARGET
    assert choice["false_pairs_at_chosen"] < FALSE_PAIR_TARGET and choice["both_met"]
    assert choice["chosen"] == pytest.approx(round(choice["chosen"], 2))  # a round number

    overlapping = threshold_choice(copies, rng.uniform(0.0, 1.0, 100_000), ["frame"] * 1000)
    assert overlapping["chosen"] == overlapping["needed_for_recall"]
    assert overlapping["recall_at_chosen"] >= RECALL_TARGET and not overlapping["both_met"]
    assert overlapping["recall_at_allowed"] < RECALL_TARGET


@pytest.mark.slow
def test_a_small_run_measures_every_figure(tmp_path, projection_bundle):
    data = tmp_path / "data"
    rows = []
    for style in CLASSES:
        for i in range(6):
            uri = f"images/{style}-{i}.jpg"
            painting(data / uri, COLOURS[style], seed=len(rows), size=(120, 90))
            rows.append({"uri": uri, "style": style, "split": "val" if i < 2 else "train"})
    pd.DataFrame(rows).to_csv(data / "catalog.csv", index=False)
    output = tmp_path / "quality.json"
    main(["--output", str(output), "--data", str(data), "--model", projection_bundle,
          "--work", str(tmp_path / "work"), "--alternatives", "1",
          "--precision=float32"])  # fmt: skip
    results = json.loads(output.read_text())
    scores = results["embedding_scores"]
    assert scores["paintings"] == 18 and scores["val"] == 6 and scores["train"] == 12
    assert scores["near_duplicates"]["copies"] == 30
    assert set(scores["near_duplicates"]["by_alteration"]) == set(ALTERATIONS)
    assert 0 <= scores["near_duplicates"]["nearest_is_original"] <= 1
    assert scores["near_pairs"]["threshold"] == scores["threshold"]["chosen"]
    assert set(scores["style_neighbours"]["by_style"]) == set(CLASSES)
    assert scores["recall_at_10_against_exact"] == pytest.approx(1.0)  # exact at this size
    assert results["index_command"]["exact"]["wall_s"] > 0
    alternatives = results["alternatives"]
    assert alternatives["projection (the embedding)"]["dimension"] == 8
    assert alternatives["hidden layer (after ReLU)"]["near_duplicates"]["copies"] == 15
