"""The service: every route, every error status, the guard against private addresses, the
bounded queue, micro-batching, and the pipeline's probabilities for the same image.

Apps run the tiny bundle's model (loaded once for all of them) under FastAPI's test
client, or under uvicorn on 127.0.0.1 where real connections matter. No packet leaves
loopback: see tests/serve_support.py.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import aiohttp
import httpx
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models.bundle import ModelBundle
from models.gradcam import overlay
from models.openvino_engine import load_openvino_classifier
from pipeline.flags import PREDICT_COMMAND
from pipeline.predict import run
from pipeline.serve import __main__ as serve_command
from pipeline.serve import service as service_module
from pipeline.serve.app import create_app
from pipeline.serve.config import ServeConfig, parse_config, serve_parser
from pipeline.serve.guard import guarded_socket
from pipeline.serve.service import batch_shapes, call_sizes
from tests import serve_support
from tests.conftest import CLASSES
from tests.serve_support import (
    PUBLIC_STAND_IN,
    live_server,
    make_app,
    painting_bytes,
    ready_client,
    tiny_grad_cam,
    tiny_model,
    wait_ready,
)
from transforms import fetch
from transforms.images import decode_image, jpeg

# The service's fixtures: no packet past loopback (autouse), a host that redirects.
loopback_only = serve_support.loopback_only
image_host = serve_support.image_host

# An HTML, CSS or script reference to another site (a CDN, a font service).
LOADS_FROM_ELSEWHERE = re.compile(
    r"""(src|href|action)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import"""
    r"""|fetch\(\s*["'](https?:)?//"""
)

ANSWER_FIELDS = {"style", "confidence", "top_k_styles", "top_k_probabilities", "model", "predict"}


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    monkeypatch.setattr(fetch, "BACKOFF_INITIAL_S", 0.01)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("serve-images")
    return {
        "red.png": painting_bytes(folder, "Red_Period"),
        "blue.jpg": painting_bytes(folder, "Blue_Period", suffix=".jpg"),
        "green.png": painting_bytes(folder, "Green_Period", seed=1),
    }


@pytest.fixture(scope="module")
def guard_calls() -> Counter:
    """Addresses the guard was asked about, for the module's guarded client."""
    return Counter()


@pytest.fixture(scope="module")
def client(tiny_bundle, guard_calls):
    """The service as started by default: the guard on."""

    def counted_guard(addr_info: tuple) -> socket.socket:
        guard_calls[addr_info[4][0]] += 1
        return guarded_socket(addr_info)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service_module, "guarded_socket", counted_guard)
        with ready_client(make_app(tiny_bundle, max_batch=4)) as client:
            yield client


@pytest.fixture(scope="module")
def open_client(tiny_bundle):
    """--allow_private_urls: fetches from the tests' hosts on 127.0.0.1."""
    app = make_app(tiny_bundle, max_batch=4, allow_private_urls=True, fetch_timeout_s=1.0)
    with ready_client(app) as client:
        yield client


def post_image(client, data: bytes, media_type: str = "image/png", route: str = "/predict"):
    return client.post(route, content=data, headers={"Content-Type": media_type})


def assert_same_answer(answer: dict, expected: dict) -> None:
    """Equal, but for float rounding: a batch of another shape may round differently."""
    probabilities = ("confidence", "top_k_probabilities")
    assert {k: v for k, v in answer.items() if k not in probabilities} == {
        k: v for k, v in expected.items() if k not in probabilities
    }
    np.testing.assert_allclose(
        answer["top_k_probabilities"], expected["top_k_probabilities"], atol=1e-6
    )


def assert_error(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["kind"] == kind, error
    assert error["message"] and "Traceback" not in response.text
    return error


# --- POST /predict ---------------------------------------------------------------------------


def test_a_raw_image_body_gets_the_batch_rows_fields_and_the_demos_predict(client, images):
    answer = post_image(client, images["red.png"]).json()
    assert set(answer) == ANSWER_FIELDS  # no url: none was given
    assert answer["predict"] == answer["style"] == answer["top_k_styles"][0]
    assert answer["model"] == "tiny-test-model"
    assert sorted(answer["top_k_styles"]) == sorted(CLASSES)  # --top_k 5, 3 styles
    assert answer["top_k_probabilities"] == sorted(answer["top_k_probabilities"], reverse=True)
    assert answer["confidence"] == answer["top_k_probabilities"][0]
    assert sum(answer["top_k_probabilities"]) == pytest.approx(1, abs=1e-5)


def test_a_multipart_upload_and_a_jpeg_body_are_read_as_the_same_image(client, images):
    uploaded = client.post("/predict", files={"file": ("blue.jpg", images["blue.jpg"])})
    raw = post_image(client, images["blue.jpg"], "image/jpeg")
    assert uploaded.status_code == raw.status_code == 200
    assert_same_answer(uploaded.json(), raw.json())


def test_the_original_demos_json_request_works_unchanged(open_client, image_host, images):
    image_host.files["red.png"] = images["red.png"]
    url = f"{image_host.url}/files/red.png"
    answer = open_client.post("/predict", json={"url": url}).json()
    assert answer["url"] == url
    assert answer["predict"] == post_image(open_client, images["red.png"]).json()["predict"]
    assert image_host.requests == Counter({"/files/red.png": 1})


def test_top_k_limits_the_styles_listed(tiny_bundle, images):
    with ready_client(make_app(tiny_bundle, max_batch=1, top_k=2)) as client:
        answer = post_image(client, images["green.png"]).json()
    assert len(answer["top_k_styles"]) == len(answer["top_k_probabilities"]) == 2


def test_a_heatmap_is_grad_cam_of_the_top_style_over_the_square_the_model_saw(tiny_bundle, images):
    with ready_client(make_app(tiny_bundle, max_batch=1, heatmaps=True)) as client:
        plain = post_image(client, images["red.png"]).json()
        answer = post_image(client, images["red.png"], route="/predict?heatmap=true").json()
    assert "heatmap" not in plain
    assert_same_answer({k: v for k, v in answer.items() if k != "heatmap"}, plain)
    prefix = "data:image/jpeg;base64,"
    assert answer["heatmap"].startswith(prefix)
    shown = decoded_jpeg(base64.b64decode(answer["heatmap"][len(prefix) :]))
    image = decode_image(images["red.png"], size=224)
    style = CLASSES.index(answer["style"])
    explanation = tiny_grad_cam(tiny_bundle)(image[np.newaxis], np.array([style]))
    expected = decoded_jpeg(jpeg(overlay(image, explanation.heatmaps[0])))
    assert shown.shape == expected.shape == (224, 224, 3)
    assert np.abs(shown.astype(int) - expected).mean() < 0.5


def decoded_jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_without_grad_cam_loaded_a_heatmap_is_left_out(client, images):
    answer = post_image(client, images["red.png"], route="/predict?heatmap=true")
    assert answer.status_code == 200 and "heatmap" not in answer.json()


# --- POST /predict/batch ---------------------------------------------------------------------


def test_a_batch_answers_each_url_in_order_with_errors_in_place(open_client, image_host, images):
    image_host.files |= {"red.png": images["red.png"], "blue.jpg": images["blue.jpg"]}
    urls = [
        f"{image_host.url}/files/blue.jpg",
        f"{image_host.url}/files/missing.png",
        "s3://bucket/painting.png",
        f"{image_host.url}/files/red.png",
    ]
    response = open_client.post("/predict/batch", json={"urls": urls})
    results = response.json()["results"]
    assert [result["url"] for result in results] == urls
    assert_same_answer(
        results[0], {**post_image(open_client, images["blue.jpg"]).json(), "url": urls[0]}
    )
    assert results[1]["error"]["kind"] == "not_found"
    assert results[2]["error"]["kind"] == "unsupported_scheme"
    assert results[3]["style"] == post_image(open_client, images["red.png"]).json()["style"]


def test_a_batch_is_capped(client):
    response = client.post("/predict/batch", json={"urls": ["https://a.test/x.png"] * 33})
    assert "at most 32" in assert_error(response, 422, "invalid_request")["message"]
    assert_error(client.post("/predict/batch", json={"urls": []}), 422, "invalid_request")


# --- The other routes ------------------------------------------------------------------------


def test_health_model_docs_and_openapi(client, tiny_bundle):
    assert client.get("/health/live").json() == {"status": "live", "model": "tiny-test-model"}
    assert client.get("/health/ready").json() == {"status": "ready", "model": "tiny-test-model"}
    assert client.get("/model").json() == ModelBundle.load(tiny_bundle).manifest.to_json()
    assert "swagger" in client.get("/docs").text.lower()
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health/live", "/health/ready", "/model"} <= set(
        schema["paths"]
    )
    accepted = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "image/jpeg"} <= set(accepted)


def test_the_page_and_its_files_are_served_and_load_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in ("/", "/static/page.js", "/static/page.css"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert not LOADS_FROM_ELSEWHERE.search(response.text), path


def test_the_docs_pages_load_their_scripts_from_the_service(client):
    for path in ("/docs", "/redoc"):
        page = client.get(path)
        assert page.status_code == 200 and not LOADS_FROM_ELSEWHERE.search(page.text), path
        for local in re.findall(r"""(?:src|href)=["'](/[^"']+)""", page.text):
            assert client.get(local).status_code == 200, local


def test_metrics_count_requests_by_route_and_status_and_show_batches_and_queue(client, images):
    post_image(client, images["red.png"])
    client.post("/predict", content=b"x", headers={"Content-Type": "text/plain"})
    client.get("/no/such/route")
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    lines = metrics.text.splitlines()
    for expected in (
        'artstyle_requests_total{route="/predict",status="200"}',
        'artstyle_requests_total{route="/predict",status="415"}',
        'artstyle_requests_total{route="unmatched",status="404"}',
        'artstyle_request_seconds_bucket{le="0.005",route="/predict"}',
        "artstyle_batch_size_count",
        "artstyle_queue_depth 0.0",
        "artstyle_requests_in_service 0.0",
        "artstyle_urls_in_service 0.0",
        "artstyle_body_bytes 0.0",
    ):
        assert any(line.startswith(expected) for line in lines), expected


def test_ready_only_once_the_model_is_loaded_and_every_batch_shape_has_run(tiny_bundle, images):
    release, calls = threading.Event(), []

    class Recorded:
        """The tiny model, its batches recorded."""

        def predict_on_batch(self, batch):
            calls.append(len(batch))
            return tiny_model(tiny_bundle).predict_on_batch(batch)

    def slow_load():
        release.wait(30)
        return Recorded()

    app = make_app(tiny_bundle, load_model=slow_load, max_batch=8)
    with TestClient(app) as client:
        assert client.get("/health/live").status_code == 200
        response = client.get("/health/ready")
        assert_error(response, 503, "not_ready")
        assert response.headers["Retry-After"] == "5"
        assert_error(post_image(client, images["red.png"]), 503, "not_ready")
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert calls == [1, 2, 4, 8]  # the warm-up: each batch shape once, before any request
        assert post_image(client, images["red.png"]).status_code == 200
        assert calls[4:] == [1]


def test_on_openvino_the_warm_up_runs_its_two_shapes_and_a_batch_runs_as_calls_of_them(
    tiny_bundle, images
):
    calls = []

    class Recorded:
        def predict_on_batch(self, batch):
            calls.append(len(batch))
            return tiny_model(tiny_bundle).predict_on_batch(batch)

    app = make_app(tiny_bundle, load_model=Recorded, engine="openvino", max_batch=16)
    with ready_client(app) as client:
        assert calls == [1, 8]
        assert post_image(client, images["red.png"]).status_code == 200
    assert calls[2:] == [1]


def test_batches_run_in_calls_of_the_shapes_their_engine_runs():
    assert batch_shapes(32, "keras") == (1, 2, 4, 8, 16, 32)
    assert batch_shapes(12, "keras") == (1, 2, 4, 8, 12)
    assert batch_shapes(32, "openvino") == (1, 8)
    assert batch_shapes(4, "openvino") == (1, 4)
    assert batch_shapes(1, "openvino") == (1,)
    assert call_sizes(5, (1, 2, 4, 8)) == [8]
    assert call_sizes(1, (1, 8)) == [1]
    assert call_sizes(3, (1, 8)) == [8]
    assert call_sizes(9, (1, 8)) == [8, 1]
    assert call_sizes(20, (1, 8)) == [8, 8, 8]


def test_a_model_that_cannot_load_fails_liveness_with_json(tiny_bundle):
    def broken():
        raise OSError("the backbone's weights are missing")

    with TestClient(make_app(tiny_bundle, load_model=broken)) as client:
        deadline = time.monotonic() + 10
        while client.get("/health/live").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert_error(client.get("/health/live"), 503, "model_failed")
        assert_error(client.get("/health/ready"), 503, "model_failed")


# --- Every error status ----------------------------------------------------------------------


def test_a_body_over_the_cap_is_413_whether_declared_or_streamed(tiny_bundle, images):
    with ready_client(make_app(tiny_bundle, max_batch=1, max_image_bytes=1000)) as client:
        assert_error(post_image(client, images["red.png"]), 413, "body_too_large")
        chunks = (b"\0" * 400 for _ in range(5))  # chunked: no Content-Length to go by
        assert_error(post_image(client, chunks), 413, "body_too_large")
        form = client.post("/predict", files={"file": ("big.png", b"\0" * 2000)})
        assert_error(form, 413, "body_too_large")
        assert_error(post_image(client, b"\0" * 1000), 422, "not_an_image")  # at the cap: read


def test_an_unsupported_media_type_is_415(client):
    assert_error(post_image(client, b"hello", "text/plain"), 415, "unsupported_media_type")
    assert_error(client.post("/predict", content=b"hello"), 415, "unsupported_media_type")
    form = client.post("/predict", data={"url": "https://a.test/x.png"})  # urlencoded
    assert_error(form, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("body", "media_type", "kind"),
    [
        (b"<html>Not found</html>", "image/png", "not_an_image"),
        (b"", "image/png", "empty"),
        (b'{"link": "https://a.test/x.png"}', "application/json", "invalid_request"),
        (b'{"url": ', "application/json", "invalid_request"),
        (b'["https://a.test/x.png"]', "application/json", "invalid_request"),
    ],
)
def test_a_body_that_is_not_a_usable_image_or_request_is_422(client, body, media_type, kind):
    assert_error(post_image(client, body, media_type), 422, kind)


def test_a_truncated_image_is_422_decode_failed(client, images):
    assert_error(post_image(client, images["red.png"][:300]), 422, "decode_failed")


def test_an_image_under_the_smallest_size_is_422_too_small(client, tmp_path):
    from tests.conftest import painting

    tiny = painting(tmp_path / "tiny.png", (10, 20, 30), 0, size=(4, 4)).read_bytes()
    assert_error(post_image(client, tiny), 422, "too_small")


def test_a_form_without_the_file_field_is_422_and_a_broken_form_400(client, images):
    wrong = client.post("/predict", files={"image": ("red.png", images["red.png"])})
    assert_error(wrong, 422, "invalid_request")
    broken = client.post(
        "/predict", content=b"--x\r\nnonsense", headers={"Content-Type": "multipart/form-data"}
    )
    assert_error(broken, 400, "invalid_request")


def test_unknown_routes_and_methods_are_json_too(client):
    assert_error(client.get("/predict"), 405, "method_not_allowed")
    assert_error(client.get("/wp-admin"), 404, "unknown_route")


def test_an_unreachable_url_is_502_and_an_upstream_404_is_422(open_client, faulty_host):
    assert_error(open_client.post("/predict", json={"url": "http://nowhere.test/a.png"}), 502,
                 "fetch_failed")  # fmt: skip
    down = open_client.post("/predict", json={"url": f"{faulty_host.url}/down.jpg"})
    assert "HTTP 503" in assert_error(down, 502, "fetch_failed")["message"]
    assert faulty_host.gets("/down.jpg") == 2  # one retry for a client that waits
    missing = open_client.post("/predict", json={"url": f"{faulty_host.url}/missing.jpg"})
    assert_error(missing, 422, "not_found")
    not_image = open_client.post("/predict", json={"url": f"{faulty_host.url}/painting.jpg"})
    assert_error(not_image, 422, "not_an_image")


def test_a_url_that_does_not_answer_in_time_is_504(open_client, faulty_host):
    started = time.monotonic()
    response = open_client.post("/predict", json={"url": f"{faulty_host.url}/trickle.jpg"})
    assert_error(response, 504, "timed_out")
    assert time.monotonic() - started < 5  # --fetch_timeout_s 1


def test_an_error_inside_the_model_is_a_json_500_without_a_trace(tiny_bundle, images):
    class Broken:
        def predict_on_batch(self, batch):
            if len(batch) == 1 and batch.any():  # the warm-up's zeros pass
                raise RuntimeError("secret internal detail")
            return np.zeros((len(batch), len(CLASSES)), np.float32)

    app = make_app(tiny_bundle, load_model=Broken, max_batch=1)
    with ready_client(app, raise_server_exceptions=False) as client:
        response = post_image(client, images["red.png"])
        assert_error(response, 500, "internal")
        assert "secret" not in response.text


# --- The guard against private addresses -----------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/files/red.png",
        "http://[::1]:{port}/files/red.png",
        "http://[::ffff:127.0.0.1]:{port}/files/red.png",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://10.0.0.1/painting.png",
        "http://100.64.0.1/painting.png",
        "https://192.168.1.1/painting.png",
        "http://loopback.test:{port}/files/red.png",  # a name that resolves to 127.0.0.1
        "http://allowed.test/redirect?to=http://127.0.0.1:{port}/files/red.png",
    ],
)
def test_private_addresses_are_refused_without_the_flag(
    client, open_client, image_host, loopback_only, guard_calls, images, url
):
    loopback_only.names |= {"loopback.test": "127.0.0.1", "allowed.test": PUBLIC_STAND_IN}
    loopback_only.stand_ins[PUBLIC_STAND_IN] = ("127.0.0.1", image_host.port)
    image_host.files["red.png"] = images["red.png"]
    url = url.format(port=image_host.port)
    guard_calls.clear()

    assert_error(client.post("/predict", json={"url": url}), 403, "forbidden_address")
    assert image_host.requests["/files/red.png"] == 0
    refused = [address for address in guard_calls if address != PUBLIC_STAND_IN]
    assert len(refused) == 1 and guard_calls[refused[0]] == 1  # checked once: never retried
    if "127.0.0.1" in url or "loopback" in url:  # the same URL, allowed: it was reachable
        assert open_client.post("/predict", json={"url": url}).status_code == 200


def test_a_public_address_is_fetched_with_the_guard_on(client, image_host, loopback_only, images):
    loopback_only.names["allowed.test"] = PUBLIC_STAND_IN
    loopback_only.stand_ins[PUBLIC_STAND_IN] = ("127.0.0.1", image_host.port)
    image_host.files["red.png"] = images["red.png"]
    answer = client.post("/predict", json={"url": "http://allowed.test/files/red.png"}).json()
    assert answer["style"] == post_image(client, images["red.png"]).json()["style"]
    assert image_host.requests["/files/red.png"] == 1


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "/etc/passwd", "gs://bucket/key.png", "data:image/png,xx"]
)
def test_only_http_urls_are_fetched_even_with_the_flag(open_client, url):
    assert_error(open_client.post("/predict", json={"url": url}), 422, "unsupported_scheme")


# --- The queue and micro-batching ------------------------------------------------------------


async def post_all(url: str, bodies: list[bytes]) -> list[tuple[int, dict, dict]]:
    async with aiohttp.ClientSession() as session:

        async def one(body: bytes):
            async with session.post(
                f"{url}/predict", data=body, headers={"Content-Type": "image/png"}
            ) as response:
                return response.status, await response.json(), dict(response.headers)

        return await asyncio.gather(*(one(body) for body in bodies))


def metric(url: str, name: str) -> float:
    async def get() -> str:
        async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as response:
            return await response.text()

    text = asyncio.run(get())
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


def test_sixteen_concurrent_requests_take_fewer_model_calls(tiny_bundle, images):
    app = make_app(tiny_bundle, max_batch=16, max_wait_ms=1000)
    bodies = [images["red.png"], images["green.png"]] * 8
    with live_server(app) as url:
        wait_ready(lambda path: httpx.get(url + path))
        answers = asyncio.run(post_all(url, bodies))
        calls = metric(url, "artstyle_batch_size_count")
        assert metric(url, "artstyle_batch_size_sum") == 16
    assert all(status == 200 for status, _, _ in answers)
    assert calls < 16, f"{calls} model calls for 16 requests"
    red, green = answers[0][1], answers[1][1]
    for i, (_, answer, _) in enumerate(answers):
        assert_same_answer(answer, (red, green)[i % 2])


def test_the_model_computes_off_the_event_loop(tiny_bundle, images):
    computing, release = threading.Event(), threading.Event()

    class Slow:
        """The tiny model, holding each request's batch until released."""

        def predict_on_batch(self, batch):
            if batch.any():  # not the warm-up's blank images
                computing.set()
                release.wait(10)
            return tiny_model(tiny_bundle).predict_on_batch(batch)

    with ready_client(make_app(tiny_bundle, load_model=Slow, max_batch=1)) as client:
        asking = threading.Thread(target=post_image, args=(client, images["red.png"]))
        asking.start()
        assert computing.wait(10)
        started = time.monotonic()
        live = client.get("/health/live")  # answered while the model is busy
        answered_in = time.monotonic() - started
        release.set()
        asking.join()
    assert live.status_code == 200 and answered_in < 2


def test_a_lone_request_does_not_wait_for_a_batch_to_fill(tiny_bundle, images):
    app = make_app(tiny_bundle, max_batch=16, max_wait_ms=5000)
    with ready_client(app) as client:
        started = time.monotonic()
        assert post_image(client, images["red.png"]).status_code == 200
        assert time.monotonic() - started < 2.5  # far under --max_wait_ms: nobody else came


def test_past_the_queue_bound_images_get_503_with_retry_after(tiny_bundle, image_host, images):
    computing, release = threading.Event(), threading.Event()

    class Held:
        """The tiny model, holding each request's batch until released."""

        def predict_on_batch(self, batch):
            if batch.any():  # not the warm-up's blank images
                computing.set()
                release.wait(10)
            return tiny_model(tiny_bundle).predict_on_batch(batch)

    image_host.files["red.png"] = images["red.png"]
    url = f"{image_host.url}/files/red.png"
    app = make_app(tiny_bundle, load_model=Held, max_batch=1, max_queue=1,
                   allow_private_urls=True)  # fmt: skip
    with ready_client(app) as client:
        holder = threading.Thread(target=post_image, args=(client, images["red.png"]))
        holder.start()
        try:
            assert computing.wait(10)  # the one place in the queue is taken
            response = post_image(client, images["red.png"])
            assert_error(response, 503, "overloaded")
            assert response.headers["Retry-After"] == "1"
            assert_error(client.post("/predict", json={"url": url}), 503, "overloaded")
            batch = client.post("/predict/batch", json={"urls": [url]})
            assert batch.json()["results"][0]["error"]["kind"] == "overloaded"  # in its place
        finally:
            release.set()
            holder.join()
        assert post_image(client, images["red.png"]).status_code == 200  # the place is free


def test_urls_whose_host_never_answers_keep_urls_out_but_not_uploads(
    tiny_bundle, faulty_host, images
):
    """A URL waits on its host in a place of its own, not in the queue's."""
    app = make_app(tiny_bundle, max_batch=1, max_queue=1, allow_private_urls=True,
                   fetch_timeout_s=2.0)  # fmt: skip
    with ready_client(app) as client:
        holder = threading.Thread(
            target=client.post,
            args=("/predict",),
            kwargs={"json": {"url": f"{faulty_host.url}/trickle.jpg"}},
        )
        holder.start()
        try:
            deadline = time.monotonic() + 5
            while not faulty_host.gets("/trickle.jpg"):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            another_url = client.post("/predict", json={"url": "https://a.test/x.png"})
            assert_error(another_url, 503, "overloaded")
            assert another_url.headers["Retry-After"] == "1"
            batch = client.post("/predict/batch", json={"urls": ["https://a.test/x.png"]})
            assert_error(batch, 503, "overloaded")
            assert post_image(client, images["red.png"]).status_code == 200  # an upload gets in
        finally:
            holder.join()  # its host's trickle outlasts --fetch_timeout_s: 504
        freed = client.post("/predict", json={"url": "https://a.test/x.png"})
        assert_error(freed, 502, "fetch_failed")  # fetched: no such host on the test network


# --- The same probabilities as the batch pipeline -------------------------------------------


@pytest.mark.parametrize("engine", ["auto", "keras"])
def test_the_same_image_gets_the_pipelines_probabilities_on_the_same_engine(
    engine, tiny_bundle, image_host, tmp_path, images
):
    """The service as it starts with --engine (OpenVINO on this CPU, by default), one image
    at a time and several in a batch, against `python -m pipeline --engine` in its own
    arithmetic (`auto`: resolved by both, from the one measurement cached per machine)."""
    names = ["red.png", "blue.jpg", "green.png"]
    for name in names:
        (tmp_path / name).write_bytes(images[name])
        image_host.files[name] = images[name]
    pd.DataFrame({"uri": [str(tmp_path / name) for name in names]}).to_csv(
        tmp_path / "catalog.csv", index=False
    )
    run([f"--input={tmp_path / 'catalog.csv'}", f"--output={tmp_path / 'out'}",
         f"--model={tiny_bundle}", f"--engine={engine}"])  # fmt: skip
    rows = pd.concat(map(pd.read_parquet, glob.glob(str(tmp_path / "out" / "predictions-*"))))
    rows = rows.set_index("uri")
    config = ServeConfig(model=tiny_bundle, engine=engine, heatmaps=False, max_batch=4,
                         allow_private_urls=True)  # fmt: skip
    app = create_app(config, ModelBundle.load(tiny_bundle))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    with ready_client(app) as client:
        service = app.state.service
        assert service.engine.engine == summary["engine"]["engine"]
        assert service.engine.engine == ("keras" if engine == "keras" else "openvino")
        assert service.precision.precision == summary["precision"]["precision"]
        alone = {name: post_image(client, images[name], media_type_of(name)).json()
                 for name in names}  # fmt: skip
        urls = [f"{image_host.url}/files/{name}" for name in names]
        together = dict(
            zip(
                names,
                client.post("/predict/batch", json={"urls": urls}).json()["results"],
                strict=True,
            )
        )
    for name in names:
        row = rows.loc[str(tmp_path / name)]
        for answer in (alone[name], together[name]):
            assert answer["top_k_styles"] == list(row["top_k_styles"])
            np.testing.assert_allclose(
                answer["top_k_probabilities"], row["top_k_probabilities"], atol=1e-6
            )


def media_type_of(name: str) -> str:
    return "image/jpeg" if name.endswith(".jpg") else "image/png"


# --- On OpenVINO: no Beam, no TensorFlow; Grad-CAM on Keras, loaded at the first heatmap -------

SERVE_AND_SAY_WHAT_LOADED = """
import json, sys, time
from fastapi.testclient import TestClient
import pipeline.serve.__main__
from models.bundle import ModelBundle
from pipeline.serve.app import create_app
from pipeline.serve.config import ServeConfig

bundle, image = sys.argv[1], open(sys.argv[2], "rb").read()
app = create_app(ServeConfig(model=bundle, max_batch=4), ModelBundle.load(bundle))
with TestClient(app) as client:
    while client.get("/health/ready").status_code != 200:
        assert app.state.service.state.value == "loading", app.state.service.state
        time.sleep(0.05)
    answer = client.post("/predict", content=image, headers={"Content-Type": "image/png"})
    assert answer.status_code == 200, answer.text
heavy = ("apache_beam", "tensorflow", "keras")
print(json.dumps({"engine": app.state.service.engine.engine,
                  **{name: name in sys.modules for name in heavy}}))
"""


def test_the_service_on_openvino_serves_without_importing_beam_or_tensorflow(
    tiny_bundle, tmp_path, images
):
    """In a fresh interpreter (this one has both): the command's module, the app, and a
    prediction served. Beam's import alone took over a second of the service's start-up."""
    load_openvino_classifier(tiny_bundle, None, "float32", 1)  # converted once per machine
    (tmp_path / "red.png").write_bytes(images["red.png"])
    script = [
        sys.executable,
        "-c",
        SERVE_AND_SAY_WHAT_LOADED,
        tiny_bundle,
        str(tmp_path / "red.png"),
    ]
    served = subprocess.run(script, capture_output=True, text=True, timeout=600)
    assert served.returncode == 0, served.stderr[-3000:]
    loaded = json.loads(served.stdout.splitlines()[-1])
    assert loaded == {"engine": "openvino", "apache_beam": False, "tensorflow": False,
                      "keras": False}  # fmt: skip


class GradCamLoads:
    """The tiny bundle's Grad-CAM, counting its loads, each held until released."""

    def __init__(self, bundle_path: str, fail: bool = False):
        self.bundle_path = bundle_path
        self.fail = fail
        self.count = 0
        self.release = threading.Event()

    def __call__(self):
        self.count += 1
        assert self.release.wait(30), "never released"
        if self.fail:
            raise OSError("no memory for TensorFlow")
        return tiny_grad_cam(self.bundle_path)


def openvino_app(bundle_path: str, load_grad_cam: GradCamLoads):
    config = ServeConfig(model=bundle_path, engine="openvino", max_batch=4)
    return create_app(config, ModelBundle.load(bundle_path), load_grad_cam=load_grad_cam)


def test_on_openvino_grad_cam_loads_at_the_first_heatmap_and_serves_every_one_after(
    tiny_bundle, images
):
    loads = GradCamLoads(tiny_bundle)
    app = openvino_app(tiny_bundle, loads)
    service = app.state.service
    with ready_client(app) as client:
        plain = post_image(client, images["red.png"]).json()
        assert loads.count == 0 and "heatmap" not in plain  # ready, and no Keras yet
        asking = [
            threading.Thread(target=post_image, args=(client, images["red.png"], "image/png",
                                                     "/predict?heatmap=true"))
            for _ in range(2)
        ]  # fmt: skip
        for thread in asking:
            thread.start()
        deadline = time.monotonic() + 30
        while loads.count < 1 or service.batcher.places.taken < 2:  # a load begun, held
            assert time.monotonic() < deadline
            time.sleep(0.01)
        loads.release.set()
        for thread in asking:
            thread.join()
        answer = post_image(client, images["red.png"], route="/predict?heatmap=true").json()
    assert loads.count == 1  # one load, for the two who waited and everyone after
    assert_same_answer({k: v for k, v in answer.items() if k != "heatmap"}, plain)
    prefix = "data:image/jpeg;base64,"
    shown = decoded_jpeg(base64.b64decode(answer["heatmap"].removeprefix(prefix)))
    image = decode_image(images["red.png"], size=224)
    explanation = tiny_grad_cam(tiny_bundle)(
        image[np.newaxis], np.array([CLASSES.index(answer["style"])])
    )
    expected = decoded_jpeg(jpeg(overlay(image, explanation.heatmaps[0])))
    assert np.abs(shown.astype(int) - expected).mean() < 0.5


def test_on_openvino_a_grad_cam_that_cannot_load_leaves_the_heatmap_out_and_says_so_once(
    tiny_bundle, images, caplog
):
    loads = GradCamLoads(tiny_bundle, fail=True)
    loads.release.set()
    with ready_client(openvino_app(tiny_bundle, loads)) as client:
        answers = [
            post_image(client, images["red.png"], route="/predict?heatmap=true") for _ in range(2)
        ]
        assert client.get("/health/ready").status_code == 200
    assert [answer.status_code for answer in answers] == [200, 200]
    assert not any("heatmap" in answer.json() for answer in answers)
    told = [r for r in caplog.records if "Grad-CAM could not be loaded" in r.getMessage()]
    assert len(told) == 1 and "no memory for TensorFlow" in told[0].exc_text
    assert loads.count == 1


# --- python -m pipeline.serve ----------------------------------------------------------------


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def test_the_flags_defaults_are_the_configs():
    assert parse_config([]) == ServeConfig()


def test_the_flags_shared_with_the_pipeline_are_its_declarations_and_other_defaults_say_why():
    pipeline_parser = argparse.ArgumentParser()
    for add_flags in PREDICT_COMMAND.groups:
        add_flags(pipeline_parser)
    in_pipeline = {action.dest: action for action in pipeline_parser._actions}
    service_parser = serve_parser()
    shared = {action.dest: action for action in service_parser._actions} & in_pipeline.keys()
    assert {"model", "top_k", "precision", "engine", "fetch_timeout_s", "max_image_bytes",
            "max_image_pixels"} <= shared  # fmt: skip
    for dest in shared - {"help"}:
        ours = next(action for action in service_parser._actions if action.dest == dest)
        theirs = in_pipeline[dest]
        assert (ours.option_strings, ours.help, ours.choices, kind_of(ours.type)) == (
            theirs.option_strings, theirs.help, theirs.choices, kind_of(theirs.type)
        ), dest  # fmt: skip
        if ours.default != theirs.default:
            assert dest in ("fetch_timeout_s", "max_image_bytes"), dest
            assert f"--{dest}" in service_parser.epilog
    shown = " ".join(service_parser.format_help().split())
    assert "(default: 15)" in shown and "(default: 20971520 bytes)" in shown
    assert parse_config(["--engine=openvino"]).engine == "openvino"
    with pytest.raises(SystemExit):
        parse_config(["--engine=tpu"])


def kind_of(parse: object) -> object:
    """An argparse type, by what made it: whole_number(1) twice is two functions."""
    return getattr(parse, "__qualname__", parse)


def test_the_command_serves_the_app_its_flags_describe(tiny_bundle, monkeypatch):
    served = {}

    def run(server, sockets):
        served.update(app=server.config.app, listening_on=[s.getsockname() for s in sockets])

    monkeypatch.setattr(serve_command.uvicorn.Server, "run", run)
    port = free_port()
    monkeypatch.setattr(sys, "argv", ["serve", f"--model={tiny_bundle}", "--host=127.0.0.1",
                                      f"--port={port}", "--max_batch=8", "--max_wait_ms=5",
                                      "--top_k=2", "--allow_private_urls"])  # fmt: skip
    serve_command.main()
    config = served["app"].state.service.config
    assert served["listening_on"] == [("127.0.0.1", port)]
    assert (config.max_batch, config.max_wait_ms, config.top_k) == (8, 5.0, 2)
    assert config.allow_private_urls and config.model == tiny_bundle


def test_an_address_in_use_is_told_first_in_one_line_status_2(tiny_bundle, monkeypatch, capsys):
    monkeypatch.setattr(serve_command.ModelBundle, "load", lambda *a: pytest.fail("loaded"))
    monkeypatch.setattr(serve_command.uvicorn.Server, "run", lambda *a: pytest.fail("served"))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        monkeypatch.setattr(sys, "argv", ["serve", f"--model={tiny_bundle}", f"--port={port}"])
        with pytest.raises(SystemExit) as exited:
            serve_command.main()
    assert exited.value.code == 2
    said = f"artstyle: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert capsys.readouterr().err == said


def test_the_services_connections_send_at_once_without_waiting_for_acknowledgements():
    """Nagle's algorithm off (TCP_NODELAY) on every connection of the service's socket, as on
    uvicorn's own: with it on, each request after the first on a kept-alive connection waited
    for the client's delayed acknowledgement."""
    address = serve_command.bind(ServeConfig(host="127.0.0.1", port=0))
    address.listen()
    nodelay: list[int] = []

    async def connect_once() -> None:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted_socket = writer.get_extra_info("socket")
            nodelay.append(accepted_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=address)
        async with server:
            _, writer = await asyncio.open_connection(*address.getsockname()[:2])
            while not nodelay:
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(asyncio.wait_for(connect_once(), 30))
    assert nodelay == [1]


def test_python_m_pipeline_serve_on_a_port_in_use_exits_2_with_one_line(tiny_bundle):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "pipeline.serve", f"--model={tiny_bundle}",
                   f"--port={port}"]  # fmt: skip
        served = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert served.returncode == 2, served.stderr
    assert served.stderr.splitlines() == [
        f"artstyle: cannot listen on 127.0.0.1:{port}: address already in use"
    ]


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--model=/no/such/bundle"], "not a model bundle"),
        (["--max_batch=0"], "--max_batch: must be at least 1"),
        (["--max_wait_ms=soon"], "--max_wait_ms: must be a number"),
    ],
)
def test_a_bad_flag_or_bundle_is_told_before_serving_status_2(flags, said, monkeypatch, capsys):
    monkeypatch.setattr(serve_command.uvicorn, "run", lambda *a, **kw: pytest.fail("served"))
    monkeypatch.setattr(sys, "argv", ["serve", *flags])
    with pytest.raises(SystemExit) as exited:
        serve_command.main()
    assert exited.value.code == 2
    assert said in capsys.readouterr().err
