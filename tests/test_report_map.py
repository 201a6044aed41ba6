"""The report's map of a run and its likely duplicates: real runs with embeddings (a tiny
bundle with a projection), their pages read and opened in a real headless browser, and the
map's and the duplicates' parts on runs' embeddings files written here."""

import hashlib
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline.report_map
from pipeline.outputs import FILES_RECORD
from pipeline.predict import run as predict
from pipeline.report import run as report
from pipeline.report_map import (
    drawn_ids,
    likely_duplicates,
    principal_plane,
    run_index,
    run_map,
)
from pipeline.report_page import REPORT_FILES, ReportError
from tests.browser import headless_chromium
from tests.conftest import CLASSES
from tests.embedding_runs import STYLES, unit_rows, write_run
from transforms.embeddings import open_run_embeddings

HOSTILE_TITLE = '</title><script>alert("title")</script><b onmouseover="alert(1)">&amp;'
HOSTILE_NAME = "<img src=x onerror=alert(1)> \"copy\" & 'more'.png"


def pattern(kind: str, size: int = 120) -> np.ndarray:
    """Pictures that the tiny bundle's embedding keeps far apart (more than 0.2 in cosine
    distance, each from each), unlike noisy fields of one colour."""
    steps = np.arange(size)
    if kind == "stripes":
        mask = np.broadcast_to((steps // 8 % 2)[None, :], (size, size))
        return np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    if kind == "bands":
        mask = np.broadcast_to((steps // 20 % 2)[:, None], (size, size))
        return np.where(mask[..., None], [200, 0, 0], [250, 220, 0]).astype(np.uint8)
    if kind == "checks":
        mask = (steps[:, None] // 16 + steps[None, :] // 16) % 2
        return np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    if kind == "tiles":
        mask = (steps[:, None] // 28 + steps[None, :] // 28) % 2
        return np.where(mask[..., None], [0, 160, 0], [200, 0, 200]).astype(np.uint8)
    if kind == "gradient":
        t = np.linspace(0, 1, size)[:, None, None]
        row = np.array([0, 0, 180]) * (1 - t) + np.array([255, 150, 0]) * t
        return np.broadcast_to(row, (size, size, 3)).astype(np.uint8)
    rng = np.random.default_rng(0)
    return np.clip(rng.normal((30, 60, 200), 25, (size, size, 3)), 0, 255).astype(np.uint8)


KINDS = ("stripes", "bands", "checks", "tiles", "gradient", "noise")


@pytest.fixture(scope="module")
def mapped_run(tmp_path_factory, projection_bundle) -> Path:
    """`python -m pipeline --embeddings --report` over a labelled catalog of six distinct
    pictures, a copy of one under a hostile name, a hostile title, a missing file and a
    text file."""
    folder = tmp_path_factory.mktemp("mapped")
    (folder / "images").mkdir()
    uris, titles = [], []
    for i, kind in enumerate(KINDS):
        Image.fromarray(pattern(kind)).save(folder / "images" / f"{kind}.png")
        uris.append(f"images/{kind}.png")
        titles.append(HOSTILE_TITLE if kind == "noise" else f"Painting {i}")
    shutil.copy(folder / "images" / "bands.png", folder / "images" / HOSTILE_NAME)
    (folder / "images" / "notes.png").write_text("not a painting")
    uris += [f"images/{HOSTILE_NAME}", "images/missing.png", "images/notes.png"]
    titles += [HOSTILE_TITLE, "Lost", "Notes"]
    labels = [CLASSES[i % len(CLASSES)] for i in range(len(uris))]
    frame = pd.DataFrame({"uri": uris, "style": labels, "title": titles})
    frame.to_csv(folder / "catalog.csv", index=False)
    output = folder / "out"
    predict([f"--input={folder / 'catalog.csv'}", f"--output={output}",
             f"--model={projection_bundle}", "--embeddings", "--report",
             "--batch_size=4"])  # fmt: skip
    return output


def predicted_rows(output: Path) -> list[dict]:
    rows = pq.read_table(list(map(str, output.glob("predictions-*.parquet")))).to_pylist()
    return [row for row in rows if row["error"] is None]


def mistakes_of(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row["label"] in CLASSES and row["style"] != row["label"]]


class MapFacts(HTMLParser):
    """What a test reads off the new sections: the map's points, the counts, the groups,
    and anything that would run: script elements and event-handler attributes."""

    def __init__(self, html: str):
        super().__init__()
        self.points: list[dict] = []
        self.counts: dict[str, int] = {}
        self.groups: dict[int, dict] = {}
        self.scripts = 0
        self.handlers: list[str] = []
        self.texts: list[str] = []
        self.sources: list[str] = []
        self._count: str | None = None
        self._group: int | None = None
        self._in_uri = False
        self._in_tooltip = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.scripts += tag == "script"
        self.handlers += [name for name in attrs if name.startswith("on")]
        if tag == "circle":
            self.points.append(attrs)
        self._in_tooltip = tag == "title" and bool(self.points) and "tooltip" not in self.points[-1]
        if tag == "img":
            self.sources.append(attrs["src"])
        if "data-count" in attrs:
            self._count = attrs["data-count"]
        if tag == "h2":  # the next section's
            self._group = None
        if "data-group" in attrs:
            self._group = int(attrs["data-group"])
            self.groups[self._group] = {"size": int(attrs["data-size"]), "uris": []}
        self._in_uri = "uri" in attrs.get("class", "").split() and self._group is not None

    def text(self) -> str:
        """The page's text, as a reader sees it: its runs of white space as one space."""
        return " ".join("".join(self.texts).split())

    def handle_data(self, data):
        self.texts.append(data)
        if self._in_tooltip:
            self.points[-1]["tooltip"] = data
            self._in_tooltip = False
        if self._count is not None:
            self.counts[self._count] = int(data.replace(",", ""))
            self._count = None
        if self._in_uri:
            self.groups[self._group]["uris"].append(data)
            self._in_uri = False


def facts_of(output: Path) -> tuple[str, MapFacts]:
    html = (output / "report.html").read_text()
    return html, MapFacts(html)


# --- A real run ------------------------------------------------------------------------


def test_the_map_draws_every_predicted_painting_and_rings_the_labelled_mistakes(mapped_run):
    _, facts = facts_of(mapped_run)
    predicted = predicted_rows(mapped_run)
    mistakes = mistakes_of(predicted)
    assert len(facts.points) == len(predicted) == 7  # the error rows have no embedding
    assert sorted(p["data-predicted"] for p in facts.points) == sorted(
        row["style"] for row in predicted
    )
    ringed = [p for p in facts.points if "mistake" in p["class"].split()]
    assert len(ringed) == len(mistakes)
    assert sorted(p["data-predicted"] for p in ringed) == sorted(row["style"] for row in mistakes)
    assert facts.counts["map.points"] == 7
    assert facts.counts["map.mistakes"] == facts.counts["map.mistakes_drawn"] == len(mistakes)
    assert facts.counts["map.errors"] == 2
    where = {p["tooltip"].split("\n")[0]: (float(p["cx"]), float(p["cy"])) for p in facts.points}
    copy, original = where[f"images/{HOSTILE_NAME}"], where["images/bands.png"]
    assert np.allclose(copy, original, atol=1.0)  # in SVG units, of a map 720 wide


def test_two_identical_images_under_two_uris_are_one_group(mapped_run):
    _, facts = facts_of(mapped_run)
    assert facts.counts["duplicates.pairs"] == 1
    assert facts.counts["duplicates.groups"] == 1
    assert facts.counts["duplicates.paintings"] == 2
    assert list(facts.groups.values()) == [
        {"size": 2, "uris": [f"images/{HOSTILE_NAME}", "images/bands.png"]}
    ]


def test_the_groups_paintings_are_pictured_without_grad_cam(mapped_run):
    html, facts = facts_of(mapped_run)
    group = html.split('<h2 id="duplicates">')[1].split("<h2")[0]
    pictures = re.findall(f'src="{REPORT_FILES}/([^"]+)"', group)
    assert len(pictures) == 2 and len(set(pictures)) == 2
    for name in pictures:
        assert Image.open(mapped_run / REPORT_FILES / name).size == (224, 224)
    samples = json.loads((mapped_run / REPORT_FILES / "samples.json").read_text())
    pictured = [s for s in samples if s["section"] == "duplicates"]
    assert [s["gradcam"] for s in pictured] == [None, None]
    named = {Path(source).name for source in facts.sources} | {"samples.json"}
    assert {path.name for path in (mapped_run / REPORT_FILES).iterdir()} == named


def test_hostile_titles_and_uris_are_text_on_the_page(mapped_run):
    html, facts = facts_of(mapped_run)
    assert facts.scripts == 0 and facts.handlers == []
    tooltips = [text for text in facts.texts if HOSTILE_TITLE in text]
    assert len(tooltips) >= 3  # two points' tooltips, and the copy's caption in its group
    assert any(f"images/{HOSTILE_NAME}" in text for text in facts.texts)
    assert "<script>" not in html and "<img src=x" not in html


def test_a_large_runs_map_draws_a_fixed_number_of_paintings_chosen_by_uri(
    mapped_run, projection_bundle, tmp_path, monkeypatch
):
    """`python -m pipeline.report` of the run, one of whose paintings was deleted since."""
    shutil.copytree(mapped_run.parent, tmp_path, dirs_exist_ok=True)
    (tmp_path / "images" / "bands.png").unlink()
    monkeypatch.setattr(pipeline.report_map, "MAP_MAX_POINTS", 4)
    output = tmp_path / "out"
    report([str(output), f"--input={tmp_path / 'catalog.csv'}", f"--model={projection_bundle}"])
    html, facts = facts_of(output)
    group = html.split('<h2 id="duplicates">')[1].split("<h2")[0]
    assert group.count("not shown: not_found") == 1 and group.count("<img ") == 1
    assert len(facts.points) == facts.counts["map.points"] == 4
    assert facts.counts["map.paintings"] == 7
    assert "draws 4 of the run's 7 paintings" in facts.text()
    digests = sorted(
        (hashlib.blake2b(row["uri"].encode(), digest_size=8).digest(), row["uri"])
        for row in predicted_rows(mapped_run)
    )
    drawn = {point["tooltip"].split("\n")[0] for point in facts.points}
    assert drawn == {uri for _, uri in digests[:4]}


def test_a_run_without_embeddings_has_no_map_and_says_how_to_have_one(
    mapped_run, projection_bundle, tmp_path
):
    """The run's embeddings moved away, and the record with them: as an earlier version
    left a run."""
    output = tmp_path / "out"
    shutil.copytree(mapped_run, output)
    for embeddings in output.glob("embeddings-*.parquet"):
        embeddings.unlink()
    (output / FILES_RECORD).unlink()
    report([str(output), f"--model={projection_bundle}", "--overwrite"])
    html, facts = facts_of(output)
    assert facts.points == [] and facts.groups == {}
    assert 'id="map"' not in html and 'id="duplicates"' not in html
    says = "No map of the run: it has no embeddings. Run python -m pipeline with --embeddings"
    assert says in facts.text()
    assert 'id="confusion"' in html  # the rest of the report as it was


def test_embeddings_of_another_run_are_one_line(mapped_run, projection_bundle, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(mapped_run, output)
    files = sorted(output.glob("embeddings-*.parquet"))
    table = pq.read_table(list(map(str, files)))
    for file in files:  # in place: the files on record, with three rows in all
        pq.write_table(table.slice(0, 3 if file == files[0] else 0), file)
    with pytest.raises(ReportError, match="do not match its predictions: 3 rows of model"):
        report([str(output), f"--model={projection_bundle}"])


# --- In a real browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium("1280,1600")


def test_the_map_and_the_groups_show_in_a_browser_as_text(browser, mapped_run):
    browser.get((mapped_run / "report.html").as_uri())
    shown = browser.execute_script(
        "const map = document.querySelector('svg.map');"
        "const box = map.getBoundingClientRect();"
        "return {points: map.querySelectorAll('circle').length, width: box.width,"
        " height: box.height, scripts: document.scripts.length,"
        " tooltips: Array.from(map.querySelectorAll('title')).map(t => t.textContent),"
        " titles: Array.from(document.querySelectorAll('.painting-title'))"
        ".map(t => t.textContent),"
        " uris: Array.from(document.querySelectorAll('.duplicate .uri')).map(u => u.textContent),"
        " broken: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".length}"
    )
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert shown["points"] == 7 and shown["width"] > 300 and shown["height"] > 200
    assert shown["scripts"] == 0 and shown["broken"] == 0 and errors == []
    assert sum(HOSTILE_TITLE in tooltip for tooltip in shown["tooltips"]) == 2
    assert HOSTILE_TITLE in shown["titles"]
    assert f"images/{HOSTILE_NAME}" in shown["uris"]


# --- The map's and the duplicates' parts, on embeddings files written here --------------


def test_the_principal_plane_keeps_distances_within_a_plane():
    rng = np.random.default_rng(0)
    plane = np.linalg.qr(rng.normal(size=(8, 2)))[0].T  # two orthonormal directions
    flat = rng.normal(size=(40, 2)) * [3.0, 1.0]
    coordinates, variance = principal_plane(flat @ plane + 5.0)
    distances = np.linalg.norm(flat[:, None] - flat[None], axis=2)
    mapped = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=2)
    np.testing.assert_allclose(mapped, distances, atol=1e-9)
    assert variance[0] > variance[1] and sum(variance) == pytest.approx(1.0)
    again, _ = principal_plane(flat @ plane + 5.0)
    np.testing.assert_array_equal(again, coordinates)


@pytest.mark.parametrize("n", [0, 1])
def test_the_principal_plane_of_no_painting_or_one(n):
    coordinates, variance = principal_plane(np.ones((n, 8)))
    assert coordinates.shape == (n, 2) and not coordinates.any() and variance == (0.0, 0.0)


def test_the_principal_plane_of_vectors_of_one_dimension_is_a_line():
    coordinates, variance = principal_plane(np.arange(5.0)[:, None])
    np.testing.assert_allclose(coordinates, [[-2, 0], [-1, 0], [0, 0], [1, 0], [2, 0]])
    assert variance == (pytest.approx(1.0), 0.0)


def test_the_paintings_drawn_are_the_same_whatever_the_order_of_the_rows(tmp_path):
    vectors = unit_rows(60)
    uris = [f"images/painting-{i:03d}.jpg" for i in range(60)]
    order = np.random.default_rng(1).permutation(60)
    one = run_index(open_run_embeddings(str(write_run(tmp_path / "a", vectors, uris))))
    other = run_index(open_run_embeddings(str(
        write_run(tmp_path / "b", vectors[order], [uris[i] for i in order], shards=3)
    )))  # fmt: skip
    drawn = [set(index.items.column("uri").take(drawn_ids(index.items.column("uri"), 20))
                 .to_pylist()) for index in (one, other)]  # fmt: skip
    assert len(drawn[0]) == 20 and drawn[0] == drawn[1]
    assert len(drawn_ids(one.items.column("uri"), 100)) == 60


def test_the_map_colours_by_predicted_style_and_marks_the_mistakes(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.report_map, "MAP_MAX_POINTS", 10)
    index = run_index(open_run_embeddings(str(write_run(tmp_path / "run", unit_rows(30)))))
    the_map = run_map(index, STYLES)
    items = index.items.to_pylist()
    assert the_map.n_paintings == 30 and len(the_map.points) == 10
    assert the_map.n_mistakes == sum(row["style"] != row["label"] for row in items)
    assert [p.mistake for p in the_map.points] == sorted(p.mistake for p in the_map.points)
    colours = {key.style: key.colour for key in the_map.styles}
    assert all(point.colour == colours[point.style] for point in the_map.points)
    assert len(set(colours.values())) == len(colours)
    assert sum(key.points for key in the_map.styles) == 10
    for point in the_map.points:
        assert 0 <= point.x <= the_map.width and 0 <= point.y <= the_map.height


PLANTED_WITHIN = 0.2  # the planted copies are nearer; 16-number random rows are not


def test_duplicates_are_the_index_near_pairs_and_the_closest_groups_are_shown(
    tmp_path, monkeypatch
):
    vectors = unit_rows(20, seed=3)
    copies = [(1, 0.0), (2, 0.0), (5, 0.02), (9, 0.01)]  # (painting, how far its copy moves)
    noise = np.random.default_rng(4).normal(size=vectors.shape[1])
    extra = [vectors[i] + shift * noise for i, shift in copies] + [vectors[1]]  # 1 thrice
    run = write_run(tmp_path / "run", np.vstack([vectors, extra]))
    monkeypatch.setattr(pipeline.report_map, "MAX_GROUPS_SHOWN", 2)
    monkeypatch.setattr(pipeline.report_map, "MAX_PAINTINGS_PER_GROUP", 2)
    index = run_index(open_run_embeddings(str(run)))
    found = likely_duplicates(index, PLANTED_WITHIN)
    pairs = index.near_pairs(PLANTED_WITHIN)
    assert found.max_distance == PLANTED_WITHIN
    assert (found.n_pairs, found.n_groups) == (len(pairs), len(set(pairs["group"].to_pylist())))
    assert (found.n_groups, found.n_paintings) == (4, 9)
    assert [group.size for group in found.groups] == [3, 2]  # painting 1's, then 2's
    assert found.groups[0].closest == found.groups[0].farthest == pytest.approx(0, abs=2e-3)
    first = found.groups[0].paintings
    assert len(first) == 2 and [row["uri"] for row in first] == sorted(row["uri"] for row in first)
    assert not found.approximate
