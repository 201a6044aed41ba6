"""What the service's tests share: a network that ends at loopback, apps on the tiny
model, live servers on 127.0.0.1, a host that redirects, and an index of paintings made by a
real run for the service's similar paintings.

No test of the service may send a packet past loopback, even when the guard under test is
broken: `loopback_only` (autouse wherever it is imported) answers every name lookup from
its own table (`Network.names`, else "no such host") and fails the test on any connect to
an address that is not 127.0.0.1 or ::1, except the stand-ins it is told of, whose connects
it turns to a server on 127.0.0.1. So "allowed.test" can resolve to a public address, be
allowed by the guard, and still be served from here.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pandas as pd
import pytest
import uvicorn
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from models.bundle import ModelBundle, load_classifier
from models.gradcam import bundle_grad_cam
from pipeline.serve.app import create_app
from pipeline.serve.config import ServeConfig
from tests.conftest import CLASSES, COLOURS, painting

# example.com's old address: a public one, so the guard lets it through; the connect is
# turned to 127.0.0.1 by `loopback_only`, so no packet is ever sent to it.
PUBLIC_STAND_IN = "93.184.216.34"
LOOPBACK = ("127.0.0.1", "::1")


@dataclass
class Network:
    names: dict[str, str | list[str]] = field(default_factory=dict)  # host -> IP address(es)
    stand_ins: dict[str, tuple[str, int]] = field(default_factory=dict)  # IP -> local server
    forbidden_connects: list = field(default_factory=list)  # what a broken guard let through


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch) -> Iterator[Network]:
    network = Network()
    real_getaddrinfo = socket.getaddrinfo
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in (None, "localhost", *network.names) and not _is_ip(name):
            raise socket.gaierror(socket.EAI_NONAME, f"{name}: no such host (test network)")
        addresses = network.names.get(name, name)
        addresses = [addresses] if isinstance(addresses, str) or addresses is None else addresses
        return [
            info
            for address in addresses
            for info in real_getaddrinfo(address, port, family, type, proto, flags)
        ]

    def destination(sock: socket.socket, address):
        """Where a connect may go: loopback, or a stand-in's local server; else the test fails."""
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return address
        if address[0] in network.stand_ins:
            return network.stand_ins[address[0]]
        if not _is_loopback(address[0]):
            network.forbidden_connects.append(address)
            raise AssertionError(f"a test tried to connect to {address}")
        return address

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name, real in (("connect", real_connect), ("connect_ex", real_connect_ex)):
        monkeypatch.setattr(socket.socket, name, _guarded(real, destination))
    yield network
    assert not network.forbidden_connects, network.forbidden_connects


def _guarded(real_connect: Callable, destination: Callable) -> Callable:
    return lambda sock, address: real_connect(sock, destination(sock, address))


def _is_loopback(host: str) -> bool:
    """127.0.0.1 and ::1, also as IPv4-mapped IPv6 (::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(host.split("%")[0])
    return str(getattr(address, "ipv4_mapped", None) or address) in LOOPBACK


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    return True


# --- Images --------------------------------------------------------------------------------


def painting_bytes(folder: Path, style: str, seed: int = 0, suffix: str = ".png") -> bytes:
    """The encoded bytes of tests/conftest.py's `painting` in the style's colour."""
    return painting(folder / f"{style}-{seed}{suffix}", COLOURS[style], seed).read_bytes()


# --- Apps and servers ----------------------------------------------------------------------


@cache
def tiny_model(bundle_path: str):
    """One classifier per bundle for the whole session, shared by every app."""
    return load_classifier(bundle_path, None, ServeConfig().precision)


@cache
def tiny_grad_cam(bundle_path: str):
    return bundle_grad_cam(ModelBundle.load(bundle_path))


def make_app(bundle_path: str, load_model: Callable | None = None, **settings):
    """An app on the bundle's shared Keras model, without Grad-CAM unless `heatmaps=True`."""
    config = ServeConfig(model=bundle_path, **{"heatmaps": False, "engine": "keras", **settings})
    return create_app(
        config,
        ModelBundle.load(bundle_path),
        load_model or (lambda: tiny_model(bundle_path)),
        lambda: tiny_grad_cam(bundle_path),
    )


def wait_ready(get: Callable[[str], object], timeout_s: float = 60) -> None:
    """Polls /health/ready (with `get(path) -> response`) until it says 200."""
    deadline = time.monotonic() + timeout_s
    while (response := get("/health/ready")).status_code != 200:
        assert "model_failed" not in response.text, "the model failed to load: see the log"
        assert time.monotonic() < deadline, f"the service never became ready: {response.text}"
        time.sleep(0.05)


@contextmanager
def ready_client(app, **kwargs) -> Iterator[TestClient]:
    with TestClient(app, **kwargs) as client:
        wait_ready(client.get)
        yield client


@contextmanager
def live_server(app) -> Iterator[str]:
    """Uvicorn serving `app` on 127.0.0.1 (a free port), in a thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class ImageHost:
    """A host on 127.0.0.1 with images at /files/NAME and /redirect?to=URL; counts GETs."""

    url: str = ""
    port: int = 0
    files: dict[str, bytes] = field(default_factory=dict)
    requests: Counter = field(default_factory=Counter)


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()

    async def files(request: Request) -> Response:
        host.requests[request.url.path] += 1
        name = request.path_params["name"]
        if name not in host.files:
            return Response(status_code=404)
        return Response(host.files[name], media_type="application/octet-stream")

    async def redirect(request: Request) -> Response:
        host.requests[request.url.path] += 1
        return RedirectResponse(request.query_params["to"], status_code=302)

    app = Starlette(routes=[Route("/files/{name}", files), Route("/redirect", redirect)])
    with live_server(app) as url:
        host.url, host.port = url, int(url.rsplit(":", 1)[1])
        yield host


# --- Similar paintings -----------------------------------------------------------------------

# The similar paintings' run: three paintings a style, one of them titled in markup that a
# page must show as text.
SIMILAR_PAINTINGS = [f"{style}-{i}.jpg" for style in CLASSES for i in range(3)]
MARKUP_TITLE = '<img src="/nowhere.png" onerror="document.title=\'run\'"> & <b>Co</b>'


@dataclass(frozen=True)
class IndexedPaintings:
    """A folder with images/NAME for each of SIMILAR_PAINTINGS, catalog.csv (relative URIs,
    titles), run/ (a run over it with --embeddings) and index/ (its index)."""

    folder: Path
    titles: tuple[str, ...]

    @property
    def index(self) -> str:
        return str(self.folder / "index")

    def uri(self, i: int) -> str:
        """As the catalog wrote it, and so as the index holds it."""
        return f"images/{SIMILAR_PAINTINGS[i]}"

    def image(self, i: int) -> bytes:
        return (self.folder / self.uri(i)).read_bytes()

    def item(self, i: int) -> int:
        """The index's id of painting i (the run wrote its rows in an order of its own)."""
        from models.vector_index import VectorIndex

        uris = VectorIndex.load(self.index).items.column("uri").to_pylist()
        return uris.index(self.uri(i))


_indexed: dict[str, IndexedPaintings] = {}


def indexed_paintings(tmp_path_factory, bundle_path: str) -> IndexedPaintings:
    """The paintings, run (in float32, as `tiny_model_with_embeddings`) and indexed once per
    session and bundle: by python -m pipeline --embeddings and python -m pipeline.index."""
    if bundle_path not in _indexed:
        from pipeline.index import run as index
        from pipeline.predict import run as predict

        folder = tmp_path_factory.mktemp("indexed")
        for i, name in enumerate(SIMILAR_PAINTINGS):
            colour = COLOURS[name.split("-")[0]]
            painting(folder / "images" / name, colour, seed=i, size=(120, 90), shapes=6)
        titles = tuple(f"Painting {i}" if i != 4 else MARKUP_TITLE
                       for i in range(len(SIMILAR_PAINTINGS)))  # fmt: skip
        catalog = pd.DataFrame(
            {"uri": [f"images/{name}" for name in SIMILAR_PAINTINGS], "title": titles}
        )
        catalog.to_csv(folder / "catalog.csv", index=False)
        predict([f"--input={folder / 'catalog.csv'}", f"--output={folder / 'run'}",
                 f"--model={bundle_path}", "--precision=float32", "--embeddings"])  # fmt: skip
        index([str(folder / "run"), f"--output={folder / 'index'}"])
        _indexed[bundle_path] = IndexedPaintings(folder, titles)
    return _indexed[bundle_path]


@cache
def tiny_model_with_embeddings(bundle_path: str):
    """The classifier that gives embeddings too, in the arithmetic the index was made in."""
    return load_classifier(bundle_path, None, "float32", embeddings=True)


def make_similar_app(bundle_path: str, index: str, **settings):
    """An app with --index on the bundle's shared Keras model with embeddings."""
    return make_app(
        bundle_path,
        load_model=lambda: tiny_model_with_embeddings(bundle_path),
        index=index,
        **settings,
    )
