"""The report: a real run's page, its numbers against summary.json, its files, and the page
opened in a real headless browser (Debian's chromium, driven by selenium)."""

import io
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

import transforms.explanations
from models.bundle import ModelBundle
from pipeline.flags import REPORT_PER_STYLE, REPORT_SAMPLES, UsageError
from pipeline.outputs import FILES_RECORD, STAGING_PREFIX, OutputError
from pipeline.predict import run as predict
from pipeline.report import main, parse_args
from pipeline.report import run as report
from pipeline.report_page import REPORT_FILES, ReportError
from tests.browser import headless_chromium
from tests.conftest import CLASSES, COLOURS, painting
from transforms.catalog import open_catalog
from transforms.explanations import (
    CONFIDENT_MISTAKES,
    LEAST_CONFIDENT,
    ExplainSamples,
    SampleRows,
)

STALE = "confusion-0000000000000000.png"  # an earlier report's chart


def make_catalog(folder: Path, labelled: bool) -> Path:
    """Four paintings per style, a missing file and a text file: a run with error rows."""
    uris, styles = [], []
    for i, style in enumerate(CLASSES * 4):
        painting(folder / "images" / f"{style}-{i}.jpg", COLOURS[style], i)
        uris.append(f"images/{style}-{i}.jpg")
        styles.append(style)
    (folder / "images" / "notes.jpg").write_text("not a painting")
    uris += ["images/missing.jpg", "images/notes.jpg"]
    styles += ["Red_Period", "Blue_Period"]
    columns = {"uri": uris, "style": styles} if labelled else {"uri": uris}
    pd.DataFrame(columns).to_csv(folder / "catalog.csv", index=False)
    return folder / "catalog.csv"


@pytest.fixture(scope="module")
def labelled_run(tmp_path_factory, tiny_bundle) -> Path:
    """`python -m pipeline ... --report` over a labelled catalog."""
    folder = tmp_path_factory.mktemp("labelled")
    catalog = make_catalog(folder, labelled=True)
    output = folder / "out"
    predict([f"--input={catalog}", f"--output={output}", f"--model={tiny_bundle}", "--report",
             "--batch_size=8"])  # fmt: skip
    return output


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory, tiny_bundle) -> Path:
    """`python -m pipeline.report DIR --overwrite` after a run over a catalog without
    labels, one of whose paintings was deleted in between, in a folder that also holds a
    report the tool has no record of (an earlier version's)."""
    folder = tmp_path_factory.mktemp("unlabelled")
    catalog = make_catalog(folder, labelled=False)
    output = folder / "out"
    predict([f"--input={catalog}", f"--output={output}", f"--model={tiny_bundle}",
             "--batch_size=8"])  # fmt: skip
    (folder / most_confident(output)["uri"]).unlink()  # surely in its style's gallery
    (output / REPORT_FILES).mkdir()
    (output / REPORT_FILES / STALE).write_bytes(b"an earlier report's chart")
    (output / "report.html").write_text("an earlier report's page")
    report([str(output), f"--input={catalog}", f"--model={tiny_bundle}", "--overwrite"])
    return output


def prediction_rows(output: Path) -> list[dict]:
    return pq.read_table(list(map(str, output.glob("predictions-*.parquet")))).to_pylist()


def most_confident(output: Path) -> dict:
    predicted = [row for row in prediction_rows(output) if row["error"] is None]
    return max(predicted, key=lambda row: row["confidence"])


class PageFacts(HTMLParser):
    """What a test reads off the page: data-key values, image sources, links."""

    def __init__(self, html: str):
        super().__init__()
        self.values: dict[str, object] = {}
        self.per_style: dict[tuple[str, str], float] = {}
        self.sources: list[str] = []
        self.links: list[str] = []
        self._style = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-key" in attrs:
            self.values[attrs["data-key"]] = json.loads(attrs["data-value"])
        if "data-style" in attrs:
            self._style = attrs["data-style"]
        if "data-metric" in attrs:
            self.per_style[(self._style, attrs["data-metric"])] = json.loads(attrs["data-value"])
        if tag == "img":
            self.sources.append(attrs["src"])
        for name in ("href", "src"):
            if name in attrs and tag != "img":
                self.links.append(attrs[name])


def page_of(output: Path) -> tuple[str, PageFacts]:
    html = (output / "report.html").read_text()
    return html, PageFacts(html)


def summary_values(summary: dict) -> dict[str, object]:
    """summary.json's numbers as the page keys them (errors_by_kind flattened)."""
    values = {k: v for k, v in summary.items() if not isinstance(v, dict) and k != "model"}
    values |= {f"errors_by_kind.{kind}": n for kind, n in summary["errors_by_kind"].items()}
    return values


def test_the_pages_numbers_are_summary_jsons(labelled_run):
    _, facts = page_of(labelled_run)
    summary = json.loads((labelled_run / "summary.json").read_text())
    expected = summary_values(summary)
    assert facts.values == {k: v for k, v in expected.items() if k in facts.values}
    assert {"n_images", "n_errors", "n_labelled", "top1", "top3", "macro_f1", "ece"} <= set(
        facts.values
    )
    assert facts.values["errors_by_kind.not_found"] == 1
    assert facts.values["errors_by_kind.not_an_image"] == 1


def test_the_per_style_table_is_the_runs_metrics(labelled_run):
    _, facts = page_of(labelled_run)
    metrics = pq.read_table(list(map(str, labelled_run.glob("metrics-*.parquet")))).to_pandas()
    per_class = metrics[metrics.section == "per_class"]
    # every style: every one has paintings in this catalog
    assert facts.per_style == {(row.label, row.metric): row.value for row in per_class.itertuples()}


def test_every_file_the_page_names_is_beside_it_and_nothing_is_fetched(labelled_run):
    html, facts = page_of(labelled_run)
    assert len(facts.sources) >= 5  # the charts, and the sampled paintings
    for source in facts.sources + facts.links:
        assert "://" not in source and not source.startswith("//")
        assert (labelled_run / source).is_file()
        assert source.startswith(f"{REPORT_FILES}/")
    assert "<script" not in html and "@import" not in html


def test_the_sampled_rows_are_the_most_confident_mistakes_and_the_least_confident(labelled_run):
    samples = json.loads((labelled_run / REPORT_FILES / "samples.json").read_text())
    rows = prediction_rows(labelled_run)
    predicted = [r for r in rows if r["error"] is None]
    mistakes = sorted(
        (r for r in predicted if r["style"] != r["label"]), key=lambda r: -r["confidence"]
    )[:12]
    least = sorted(predicted, key=lambda r: r["confidence"])[:12]
    by_section = {
        section: sorted(s["uri"] for s in samples if s["section"] == section)
        for section in (CONFIDENT_MISTAKES, LEAST_CONFIDENT)
    }
    assert by_section[CONFIDENT_MISTAKES] == sorted(r["uri"] for r in mistakes)
    assert by_section[LEAST_CONFIDENT] == sorted(r["uri"] for r in least)
    for sample in samples:
        image = Image.open(labelled_run / REPORT_FILES / sample["gradcam"])
        assert image.size == (224, 224) and sample["error"] is None


def test_without_labels_a_gallery_per_predicted_style(unlabelled_run):
    html, facts = page_of(unlabelled_run)
    samples = json.loads((unlabelled_run / REPORT_FILES / "samples.json").read_text())
    rows = prediction_rows(unlabelled_run)
    predicted = [r for r in rows if r["error"] is None]
    assert {s["section"] for s in samples} == {"gallery"}
    assert {s["style"] for s in samples} == {r["style"] for r in predicted}
    assert "Confusion matrix" not in html and "Predicted styles" in html
    assert facts.values == {"n_images": 14, "n_errors": 2} | {
        "errors_by_kind.not_found": 1,
        "errors_by_kind.not_an_image": 1,
    }
    deleted = [s for s in samples if s["uri"] == most_confident(unlabelled_run)["uri"]]
    assert deleted and deleted[0]["error"].startswith("not_found")
    assert "not shown: not_found" in html


def test_a_run_of_a_model_without_embeddings_has_no_map_and_says_why(labelled_run):
    html, _ = page_of(labelled_run)
    assert 'id="map"' not in html and 'id="duplicates"' not in html and "<svg" not in html
    assert (
        "No map of the run: model tiny-test-model gives no embeddings (a bundle trained with "
        "--projection does" in " ".join(html.split())
    )


def test_a_report_replaces_the_earlier_page_and_files_and_records_them(unlabelled_run):
    assert not (unlabelled_run / REPORT_FILES / STALE).exists()
    _, facts = page_of(unlabelled_run)
    named = {Path(source).name for source in facts.sources} | {"samples.json"}
    assert {path.name for path in (unlabelled_run / REPORT_FILES).iterdir()} == named
    recorded = json.loads((unlabelled_run / FILES_RECORD).read_text())["files"]
    assert {"report.html", REPORT_FILES, "summary.json"} <= set(recorded)
    assert not list(unlabelled_run.glob(f"{STAGING_PREFIX}*"))


@pytest.mark.parametrize("run", ["labelled_run", "unlabelled_run"])
def test_the_page_names_the_runs_folder_not_where_it_was_written(run, request):
    output = request.getfixturevalue(run)
    html, _ = page_of(output)
    assert f"images from <code>{output}</code>" in html
    assert STAGING_PREFIX not in html  # nowhere: not in the text, nor in a link or a picture


def test_a_report_the_tool_has_no_record_of_is_replaced_only_when_asked(
    unlabelled_run, tiny_bundle, tmp_path
):
    earlier = tmp_path / "out"
    shutil.copytree(unlabelled_run, earlier)
    (earlier / FILES_RECORD).unlink()  # as an earlier version left it
    page = (earlier / "report.html").read_bytes()
    with pytest.raises(
        OutputError, match=r"\(report.html, report_files\): move them away, or pass --overwrite"
    ):
        report([str(earlier), f"--model={tiny_bundle}"])
    assert (earlier / "report.html").read_bytes() == page


def test_a_failed_report_leaves_the_earlier_page_whole(labelled_run, tiny_bundle, monkeypatch):
    before = (labelled_run / "report.html").read_bytes()
    named = PageFacts(before.decode()).sources

    def broken(*args, **kwargs):
        raise RuntimeError("the explainer broke")

    monkeypatch.setattr(transforms.explanations, "bundle_grad_cam", broken)
    with pytest.raises(Exception, match="the explainer broke"):
        report([str(labelled_run), f"--model={tiny_bundle}"])
    assert (labelled_run / "report.html").read_bytes() == before
    assert all((labelled_run / source).is_file() for source in named)
    assert not list(labelled_run.glob(f"{STAGING_PREFIX}*"))


def test_a_mistyped_flag_is_an_error_not_a_beam_option():
    with pytest.raises(UsageError, match="unknown flag --sample"):
        parse_args(["out", "--sample=3"])
    args, beam_args = parse_args(["out", "--samples=3", "--direct_num_workers=2"])
    assert args.samples == 3 and beam_args == ["--direct_num_workers=2"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "{folder!r} has no summary.json: not the output of a finished run of python -m "
             "pipeline"),
        (["--runer=DirectRunner"], "unknown flag --runer (did you mean --runner?)"),
    ],
)  # fmt: skip
def test_a_folder_without_a_run_or_a_mistyped_flag_is_one_line_and_status_2(
    flags, message, tmp_path, tiny_bundle, monkeypatch, capsys
):
    monkeypatch.setattr("sys.argv", ["report", str(tmp_path), f"--model={tiny_bundle}", *flags])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"artstyle: {message.format(folder=str(tmp_path))}\n"


def test_another_models_run_is_a_clear_error(labelled_run, tiny_bundle, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "id": "another-model"}))
    with pytest.raises(ReportError, match="name its bundle with --model"):
        report([str(labelled_run), f"--model={other}"])


def test_sampling_picks_by_confidence_with_ties_broken_by_uri():
    def row(uri, label, style, confidence, error=None):
        return {"uri": uri, "label": label, "style": style, "confidence": confidence,
                "error": error}  # fmt: skip

    rows = [
        row("a", "X", "Y", 0.9),
        row("b", "X", "Y", 0.9),
        row("c", "X", "X", 0.95),
        row("d", "X", "Y", 0.3),
        row("e", "Unknown", "Y", 0.99),  # a label the model does not know: not a mistake
        row("f", "X", None, None, error="not_found: gone"),
    ]
    with TestPipeline() as pipeline:
        samples = (
            pipeline
            | beam.Create(rows)
            | SampleRows(["X", "Y"], labelled=True, count=2, per_style=1)
            | beam.Map(lambda sample: (sample[0], sample[1]["uri"]))
        )
        assert_that(
            samples,
            equal_to([(CONFIDENT_MISTAKES, "b"), (CONFIDENT_MISTAKES, "a"),
                      (LEAST_CONFIDENT, "d"), (LEAST_CONFIDENT, "a")]),
        )  # fmt: skip


def test_sampled_images_are_found_in_their_own_catalog_files_folder(tmp_path, tiny_bundle):
    """Catalog shards in two folders: each sampled row's image is read from its own. (The
    second row is an earlier version's, whose column of probabilities had another name.)"""
    rows = []
    for museum, style, probabilities in (("museum_a", "Blue_Period", "top_k_probabilities"),
                                         ("museum_b", "Red_Period", "top_k_probs")):  # fmt: skip
        painting(tmp_path / museum / f"{museum}.jpg", COLOURS[style], seed=1)
        (tmp_path / museum / "catalog.csv").write_text(f"uri\n{museum}.jpg\n")
        rows.append({"uri": f"{museum}.jpg", "label": None, "style": style, "confidence": 0.9,
                     "top_k_styles": [style], probabilities: [0.9], "error": None})  # fmt: skip
    catalog = open_catalog(str(tmp_path / "museum_*" / "catalog.csv"))
    explain = ExplainSamples(ModelBundle.load(tiny_bundle), labelled=False,
                             files_dir=str(tmp_path / "files"), catalog=catalog,
                             count=REPORT_SAMPLES, per_style=REPORT_PER_STYLE)  # fmt: skip
    with TestPipeline() as pipeline:
        samples = pipeline | beam.Create(rows) | explain
        found = samples | beam.Map(
            lambda sample: (sample["uri"], sample["error"], sample["top_k_probabilities"])
        )
        assert_that(found, equal_to([("museum_a.jpg", None, [0.9]), ("museum_b.jpg", None, [0.9])]))


def test_a_later_run_without_report_takes_the_earlier_report_away(tmp_path, tiny_bundle):
    """The page belongs to the results it describes: it goes when they are replaced."""
    catalog, output = make_catalog(tmp_path, labelled=True), tmp_path / "out"
    argv = [f"--input={catalog}", f"--output={output}", f"--model={tiny_bundle}"]
    predict([*argv, "--report"])
    assert (output / "report.html").is_file() and any((output / REPORT_FILES).iterdir())
    predict(argv)
    assert not (output / "report.html").exists() and not (output / REPORT_FILES).exists()
    assert list(output.glob("predictions-*.parquet"))


# --- In a real browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium("1280,1600")


def open_page(browser, output: Path) -> None:
    browser.get((output / "report.html").as_uri())
    browser.get_log("browser")  # what an earlier page logged


@pytest.mark.parametrize("run", ["labelled_run", "unlabelled_run"])
def test_the_page_opens_in_a_browser_with_every_image_and_no_errors(browser, run, request):
    output = request.getfixturevalue(run)
    open_page(browser, output)
    broken = browser.execute_script(
        "return Array.from(document.images)"
        ".filter(image => !(image.complete && image.naturalWidth > 0))"
        ".map(image => image.getAttribute('src'))"
    )
    images = browser.execute_script("return document.images.length")
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name)"
    )
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert images >= 5 and broken == []
    assert errors == []
    assert all(url.startswith("file://") for url in fetched)

    screenshot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))
    assert screenshot.std() > 20  # not a blank page
    assert len(np.unique(screenshot.reshape(-1, 3), axis=0)) > 500  # charts and paintings


def test_the_numbers_the_browser_shows_are_summary_jsons(browser, labelled_run):
    open_page(browser, labelled_run)
    shown = browser.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('[data-key]'))"
        ".map(cell => [cell.dataset.key, [JSON.parse(cell.dataset.value), cell.innerText]]))"
    )
    summary = json.loads((labelled_run / "summary.json").read_text())
    expected = summary_values(summary)
    assert {key: value for key, (value, _) in shown.items()} == {
        key: expected[key] for key in shown
    }
    assert shown["top1"][1] == f"{summary['top1']:.1%}"
    assert shown["n_images"][1] == f"{summary['n_images']:,}"
