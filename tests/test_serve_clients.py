"""Clients that misbehave, on a real uvicorn on 127.0.0.1 and bare sockets: a body that
never ends, a client that hangs up halfway, and crowds of slow bodies that must not keep a
normal request out. Every route that reads a body is tried: /predict's three kinds of
body and /predict/batch.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import select
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from tests import serve_support
from tests.serve_support import live_server, make_app, painting_bytes, wait_ready

loopback_only = serve_support.loopback_only
image_host = serve_support.image_host

WAIT_S = 30  # the longest any test waits for an answer it expects

# Each route and kind of body that a client can leave unfinished: (route, Content-Type,
# the body's first bytes). None of them is a whole body.
UNFINISHED_BODIES = {
    "image": ("/predict", "image/png", b"\x89PNG\r\n\x1a\n"),
    "multipart": (
        "/predict",
        "multipart/form-data; boundary=edge",
        b'--edge\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\n\x89PNG",
    ),
    "json": ("/predict", "application/json", b'{"url": "http://'),
    "batch": ("/predict/batch", "application/json", b'{"urls": ["http://'),
}
DECLARED_LENGTH = 10_000  # what each unfinished body says it will send


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def start_request(url: str, kind: str) -> socket.socket:
    """A bare client that sends a request's head and the first bytes of its body, then waits."""
    route, media_type, first_bytes = UNFINISHED_BODIES[kind]
    client = socket.create_connection(("127.0.0.1", port_of(url)), timeout=WAIT_S)
    client.sendall(
        f"POST {route} HTTP/1.1\r\nHost: artstyle\r\nContent-Type: {media_type}\r\n"
        f"Content-Length: {DECLARED_LENGTH}\r\n\r\n".encode()
        + first_bytes
    )
    return client


def read_answer(client: socket.socket) -> tuple[int, dict]:
    response = http.client.HTTPResponse(client)
    response.begin()
    return response.status, json.loads(response.read())


def has_answered(client: socket.socket) -> bool:
    readable, _, _ = select.select([client], [], [], 0)
    return bool(readable)


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def answers_counted(url: str, route: str) -> dict[str, float]:
    """/metrics' count of answers on `route`, by status."""
    pattern = rf'^artstyle_requests_total\{{route="{re.escape(route)}",status="(\d+)"\}} (\S+)$'
    return {
        status: float(count) for status, count in re.findall(pattern, metrics(url), re.MULTILINE)
    }


def gauge(url: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", metrics(url), re.MULTILINE).group(1))


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


@contextmanager
def serving(tiny_bundle: str, **settings) -> Iterator[str]:
    with live_server(make_app(tiny_bundle, max_batch=4, **settings)) as url:
        wait_ready(lambda path: httpx.get(url + path))
        yield url


@pytest.fixture(scope="module")
def service(tiny_bundle) -> Iterator[str]:
    """A service whose body deadline is short, so that tests can outwait it."""
    with serving(tiny_bundle, fetch_timeout_s=1.0) as url:
        yield url


@pytest.fixture
def errors_logged(caplog) -> list[logging.LogRecord]:
    """The ERROR records any logger writes during the test (uvicorn's own loggers may not
    propagate to the root, where caplog listens)."""
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_logger.addHandler(caplog.handler)
    try:
        yield caplog.records
    finally:
        uvicorn_logger.removeHandler(caplog.handler)


# --- A client that hangs up ------------------------------------------------------------------


@pytest.mark.parametrize("kind", UNFINISHED_BODIES)
def test_a_client_that_hangs_up_mid_body_is_counted_499_without_a_traceback(
    service, errors_logged, kind
):
    route = UNFINISHED_BODIES[kind][0]
    before = answers_counted(service, route)
    start_request(service, kind).close()
    wait_until(lambda: answers_counted(service, route) != before, f"{route} counted")
    after = answers_counted(service, route)
    new = {status: after[status] - before.get(status, 0) for status in after}
    assert {status: n for status, n in new.items() if n} == {"499": 1}
    errors = [record for record in errors_logged if record.levelno >= logging.ERROR]
    assert errors == [], [record.getMessage() for record in errors]


# --- A body that never ends ------------------------------------------------------------------


@pytest.mark.parametrize("kind", UNFINISHED_BODIES)
def test_a_body_trickled_past_the_deadline_is_408_on_every_route(service, kind):
    """A byte every 0.25 s, always sooner than the 1 s deadline, never the whole body."""
    with start_request(service, kind) as client:
        deadline = time.monotonic() + WAIT_S
        while not has_answered(client):
            assert time.monotonic() < deadline, "the service let the body trickle on"
            client.sendall(b"0")
            select.select([client], [], [], 0.25)
        status, answer = read_answer(client)
    assert (status, answer["error"]["kind"]) == (408, "body_timeout"), answer


# --- Slow bodies and everyone else -----------------------------------------------------------


def test_a_crowd_of_slow_bodies_keeps_no_normal_request_waiting(tiny_bundle, image_host, tmp_path):
    """Three times as many unfinished bodies as the queue has places, all in the service's
    hands, and still every kind of normal request is answered while they wait."""
    max_queue = 4
    image = painting_bytes(tmp_path, "Red_Period")
    image_host.files["red.png"] = image
    settings = {"max_queue": max_queue, "fetch_timeout_s": 60.0, "allow_private_urls": True}
    with serving(tiny_bundle, **settings) as url, ExitStack() as stack:
        kinds = list(UNFINISHED_BODIES) * (3 * max_queue // len(UNFINISHED_BODIES))
        slow = [stack.enter_context(start_request(url, kind)) for kind in kinds]
        sent = sum(len(UNFINISHED_BODIES[kind][2]) for kind in kinds)
        wait_until(lambda: gauge(url, "artstyle_body_bytes") == sent, "the slow bodies read")

        answers = [
            httpx.post(f"{url}/predict", content=image, headers={"Content-Type": "image/png"}),
            httpx.post(f"{url}/predict", files={"file": ("red.png", image)}),
            httpx.post(f"{url}/predict", json={"url": f"{image_host.url}/files/red.png"}),
            httpx.post(f"{url}/predict/batch", json={"urls": [f"{image_host.url}/files/red.png"]}),
        ]
        assert [answer.status_code for answer in answers] == [200] * 4, answers[0].text
        assert not any(has_answered(client) for client in slow)  # still waiting, all of them


def test_bodies_in_memory_are_bounded_by_bytes_and_freed_with_their_answer(tiny_bundle):
    """--max_queue x --max_image_bytes of bodies at once: past it 503, until one is done."""
    settings = {"max_queue": 2, "max_image_bytes": DECLARED_LENGTH, "fetch_timeout_s": 60.0}
    with serving(tiny_bundle, **settings) as url:
        budget = 2 * DECLARED_LENGTH
        first, second = start_request(url, "image"), start_request(url, "image")
        for client in (first, second):
            client.sendall(b"\0" * (DECLARED_LENGTH - 1000))
        held = 2 * (DECLARED_LENGTH - 1000 + len(UNFINISHED_BODIES["image"][2]))
        wait_until(lambda: gauge(url, "artstyle_body_bytes") == held, "both bodies held")

        one_byte_too_many = {"content": b"\0" * (budget - held + 1),
                             "headers": {"Content-Type": "image/png"}}  # fmt: skip
        refused = httpx.post(f"{url}/predict", **one_byte_too_many)
        assert refused.status_code == 503 and refused.json()["error"]["kind"] == "overloaded"
        assert refused.headers["Retry-After"] == "1"

        first.close()
        wait_until(lambda: gauge(url, "artstyle_body_bytes") == held / 2, "the first let go")
        read = httpx.post(f"{url}/predict", **one_byte_too_many)
        assert read.json()["error"]["kind"] == "not_an_image"  # read whole, then judged
        second.close()
        wait_until(lambda: gauge(url, "artstyle_body_bytes") == 0, "every body let go")
