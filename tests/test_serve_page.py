"""The page at / in a real headless browser (Debian's chromium, driven by selenium): an image
chosen, dropped or named by URL comes back as bars, the expected top style first, and, on a
service with --index, the nearest paintings as thumbnails under them; nothing is loaded
from anywhere but the service; no console errors; a screenshot that is not blank."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import serve_support
from tests.browser import headless_chromium
from tests.serve_support import (
    MARKUP_TITLE,
    indexed_paintings,
    live_server,
    make_app,
    make_similar_app,
    painting_bytes,
    wait_ready,
)

loopback_only = serve_support.loopback_only
image_host = serve_support.image_host

WAIT_S = 30


@pytest.fixture(scope="module")
def browser():
    yield from headless_chromium("1100,900")


@pytest.fixture(scope="module")
def service_url(tiny_bundle):
    app = make_app(tiny_bundle, max_batch=4, allow_private_urls=True, heatmaps=True,
                   fetch_timeout_s=3.0)  # fmt: skip
    with live_server(app) as url:
        wait_ready(lambda path: httpx.get(url + path))
        yield url


def expected_answer(service_url: str, data: bytes) -> dict:
    return httpx.post(
        f"{service_url}/predict", content=data, headers={"Content-Type": "image/png"}
    ).json()


def open_page(browser, service_url: str) -> None:
    browser.get(f"{service_url}/")
    browser.get_log("browser")  # what an earlier page logged


def shown_bars(browser) -> list[dict]:
    """The bars, once they are shown: each one's style, probability and drawn width."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.execute_script(
            "return !document.getElementById('result').hidden"
            " && document.querySelectorAll('#bars .bar').length > 0"
        )
    )
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#bars .bar')).map(bar => ({"
        " style: bar.dataset.style, probability: Number(bar.dataset.probability),"
        " width: bar.querySelector('.bar-fill').getBoundingClientRect().width}))"
    )


def assert_shows(browser, answer: dict) -> None:
    bars = shown_bars(browser)
    assert [bar["style"] for bar in bars] == answer["top_k_styles"]
    np.testing.assert_allclose([bar["probability"] for bar in bars], answer["top_k_probabilities"])
    widths = [bar["width"] for bar in bars]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1] > 0
    heading = browser.find_element("id", "top-style").text
    assert heading == answer["style"].replace("_", " ")
    heatmap_width = browser.execute_script(
        "const heatmap = document.getElementById('heatmap');"
        "return heatmap.closest('figure').hidden ? 0 : heatmap.naturalWidth"
    )
    assert heatmap_width == 224  # Grad-CAM over the model's square


def shown_images(browser) -> list[dict]:
    """Every image the page lays out, once each has loaded or failed: whether it can be seen
    (a failed one is the browser's broken-image placeholder and its alt text)."""
    from selenium.webdriver.support.ui import WebDriverWait

    laid_out = "Array.from(document.images).filter(img => img.getClientRects().length > 0)"
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.execute_script(f"return {laid_out}.every(img => img.complete)")
    )
    return browser.execute_script(
        f"return {laid_out}.map(img => ({{id: img.id, seen: img.naturalWidth > 0}}))"
    )


def assert_no_broken_image(browser) -> None:
    assert all(image["seen"] for image in shown_images(browser)), shown_images(browser)


def assert_offline_and_quiet(browser, service_url: str) -> None:
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name)"
    )
    assert all(url.startswith(("http://127.0.0.1", "blob:", "data:")) for url in fetched), fetched
    assert any(url.startswith(service_url) for url in fetched)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []


def test_before_anything_is_chosen_no_result_and_no_image_is_shown(browser, service_url):
    open_page(browser, service_url)
    assert not browser.find_element("id", "result").is_displayed()
    assert shown_images(browser) == []
    assert_offline_and_quiet(browser, service_url)


def test_an_uploaded_image_shows_its_styles_as_bars(browser, service_url, tmp_path):
    data = painting_bytes(tmp_path, "Red_Period")
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    open_page(browser, service_url)
    browser.find_element("id", "file-input").send_keys(str(path))
    assert_shows(browser, expected_answer(service_url, data))
    assert_no_broken_image(browser)
    assert_offline_and_quiet(browser, service_url)
    assert not browser.find_element("id", "similar").is_displayed()  # no --index

    screenshot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))
    assert screenshot.std() > 20  # not a blank page
    assert len(np.unique(screenshot.reshape(-1, 3), axis=0)) > 200  # text, bars, the image


def test_a_dropped_image_shows_its_styles(browser, service_url, tmp_path):
    data = painting_bytes(tmp_path, "Blue_Period", seed=3)
    open_page(browser, service_url)
    browser.execute_script(
        """const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        const zone = document.getElementById("drop-zone");
        zone.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));""",
        base64.b64encode(data).decode(),
    )
    assert_shows(browser, expected_answer(service_url, data))
    assert_offline_and_quiet(browser, service_url)


def test_a_pasted_url_shows_its_styles(browser, service_url, image_host, tmp_path: Path):
    data = painting_bytes(tmp_path, "Green_Period", seed=4)
    image_host.files["linked.png"] = data
    open_page(browser, service_url)
    browser.find_element("id", "url-input").send_keys(f"{image_host.url}/files/linked.png")
    browser.find_element("css selector", "#url-form button").click()
    assert_shows(browser, expected_answer(service_url, data))
    assert_offline_and_quiet(browser, service_url)


def test_an_image_the_browser_cannot_show_is_predicted_without_a_broken_preview(
    browser, service_url, tmp_path
):
    """A TIFF: the service reads it, the browser does not; the heatmap still shows it."""
    path = tmp_path / "scan.tif"
    path.write_bytes(painting_bytes(tmp_path, "Blue_Period", seed=5, suffix=".tif"))
    open_page(browser, service_url)
    browser.find_element("id", "file-input").send_keys(str(path))
    assert_shows(browser, expected_answer(service_url, path.read_bytes()))
    assert_no_broken_image(browser)
    assert [image["id"] for image in shown_images(browser)] == ["heatmap"]


def test_a_late_answer_to_an_earlier_image_does_not_replace_the_latest(
    browser, service_url, faulty_host, tmp_path
):
    """A URL whose host trickles (504 after --fetch_timeout_s), then an upload: the upload's
    bars stay when the URL's error arrives."""
    from selenium.webdriver.support.ui import WebDriverWait

    data = painting_bytes(tmp_path, "Green_Period", seed=6)
    path = tmp_path / "latest.png"
    path.write_bytes(data)
    open_page(browser, service_url)
    browser.find_element("id", "url-input").send_keys(f"{faulty_host.url}/trickle.jpg")
    browser.find_element("css selector", "#url-form button").click()
    browser.find_element("id", "file-input").send_keys(str(path))
    assert_shows(browser, expected_answer(service_url, data))
    WebDriverWait(browser, WAIT_S).until(  # both answers are in
        lambda b: (
            b.execute_script(
                "return performance.getEntriesByType('resource')"
                ".filter(entry => entry.name.includes('/predict')).length"
            )
            == 2
        )
    )
    assert_shows(browser, expected_answer(service_url, data))
    assert browser.find_element("id", "status").text == ""


def test_an_error_is_told_in_words(browser, service_url, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a painting")
    open_page(browser, service_url)
    browser.find_element("id", "file-input").send_keys(str(path))
    from selenium.webdriver.support.ui import WebDriverWait

    status = browser.find_element("id", "status")
    WebDriverWait(browser, WAIT_S).until(lambda _: "Not predicted" in status.text)
    assert "not a JPEG/PNG" in status.text and "error" in status.get_attribute("class")
    assert browser.find_element("id", "result").get_attribute("hidden") is not None


def test_the_api_docs_render_from_the_service_alone(browser, service_url):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{service_url}/docs")
    browser.get_log("browser")
    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.execute_script("return document.querySelectorAll('.opblock').length") >= 5
    )
    assert "/predict/batch" in browser.find_element("css selector", ".swagger-ui").text
    assert_offline_and_quiet(browser, service_url)


# --- Similar paintings (--index) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, projection_bundle):
    return indexed_paintings(tmp_path_factory, projection_bundle)


@pytest.fixture(scope="module")
def similar_url(projection_bundle, indexed):
    with live_server(make_similar_app(projection_bundle, indexed.index, max_batch=4)) as url:
        wait_ready(lambda path: httpx.get(url + path))
        yield url


def expected_similar(similar_url: str, data: bytes) -> dict:
    response = httpx.post(
        f"{similar_url}/similar", content=data, headers={"Content-Type": "image/jpeg"}
    )
    assert response.status_code == 200, response.text
    return response.json()


def shown_neighbours(browser) -> list[dict]:
    """The similar paintings, once they are shown and each thumbnail has loaded or failed."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, WAIT_S).until(
        lambda b: b.execute_script(
            "const items = document.querySelectorAll('#neighbours .neighbour');"
            "return !document.getElementById('similar').hidden && items.length > 0"
            " && Array.from(items).every(item => item.querySelector('.missing')"
            "   || !item.querySelector('img').hidden)"
        )
    )
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#neighbours .neighbour')).map(item => {"
        " const img = item.querySelector('img');"
        " return {id: Number(item.dataset.id),"
        "  title: item.querySelector('.neighbour-title').textContent,"
        "  style: item.querySelector('.neighbour-style').textContent,"
        "  distance: item.querySelector('.neighbour-distance').textContent,"
        "  width: img ? img.naturalWidth : 0, drawn: img ? img.getBoundingClientRect().width : 0,"
        "  missing: item.querySelector('.missing') ? item.querySelector('.missing').textContent"
        "   : null}})"
    )


def upload(browser, path: Path) -> None:
    browser.find_element("id", "file-input").send_keys(str(path))


def test_with_an_index_the_nearest_paintings_show_under_the_prediction(
    browser, similar_url, indexed, tmp_path, monkeypatch
):
    monkeypatch.chdir(indexed.folder)  # where the index's relative URIs are
    path = tmp_path / "query.jpg"
    path.write_bytes(indexed.image(4))
    expected = expected_similar(similar_url, indexed.image(4))
    open_page(browser, similar_url)
    assert not browser.find_element("id", "similar").is_displayed()
    assert shown_images(browser) == []  # nothing before an image is chosen
    upload(browser, path)

    bars = shown_bars(browser)
    assert [bar["style"] for bar in bars] == expected["top_k_styles"]
    neighbours = shown_neighbours(browser)
    assert [n["id"] for n in neighbours] == [n["id"] for n in expected["neighbours"]]
    assert [n["title"] for n in neighbours] == [n["title"] for n in expected["neighbours"]]
    assert neighbours[0]["title"] == MARKUP_TITLE  # shown as the text it is, not run as HTML
    assert browser.title == "artstyle: the style of a painting"
    for shown, answer in zip(neighbours, expected["neighbours"], strict=True):
        assert shown["style"].startswith(answer["style"].replace("_", " "))
        distance = f"distance {answer['distance']:.3f}"
        assert shown["distance"] == ("the same picture" if answer["same_picture"] else distance)
        assert shown["width"] == 160 and shown["drawn"] > 0 and shown["missing"] is None
    about = browser.find_element("id", "similar-about").text
    assert about.startswith("The most similar of the 9 paintings in the index")
    section, result = (browser.find_element("id", name).rect for name in ("similar", "result"))
    assert section["y"] >= result["y"] + result["height"]  # under the prediction
    assert_no_broken_image(browser)
    assert_offline_and_quiet(browser, similar_url)
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(entry => entry.name)"
    )
    assert not any("nowhere" in url for url in fetched)
    assert sum("/similar?" in url for url in fetched) == 1
    assert not any("/predict" in url for url in fetched)  # one request for the whole answer


def test_a_thumbnail_the_service_cannot_make_is_a_box_that_says_so(
    browser, projection_bundle, indexed, tmp_path, monkeypatch
):
    """A service of its own: its thumbnails' cache, and the browser's, hold none yet."""
    monkeypatch.chdir(tmp_path)  # copies of the index's images, one of them gone
    for i in range(9):
        copy = tmp_path / indexed.uri(i)
        copy.parent.mkdir(exist_ok=True)
        copy.write_bytes(indexed.image(i))
    path = tmp_path / "query.jpg"
    path.write_bytes(indexed.image(0))
    with live_server(make_similar_app(projection_bundle, indexed.index, max_batch=1)) as url:
        wait_ready(lambda path: httpx.get(url + path))
        gone = expected_similar(url, indexed.image(0))["neighbours"][-1]
        (tmp_path / gone["uri"]).unlink()
        open_page(browser, url)
        upload(browser, path)
        neighbours = shown_neighbours(browser)
    missing = [n for n in neighbours if n["missing"] is not None]
    assert [n["id"] for n in missing] == [gone["id"]] and missing[0]["missing"] == "no picture"
    assert_no_broken_image(browser)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert all("502" in entry["message"] for entry in errors), errors  # the failed thumbnail's
