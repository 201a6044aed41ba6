"""The service's similar paintings (--index): POST /similar on uploads and URLs, its k and
max_distance, GET /similar/index, the thumbnails of the index's items (and the guard on the
URIs an index names), both engines, and --index checked at start-up.

The index is made by a real run of the tiny projection bundle over paintings made here
(python -m pipeline --embeddings, then python -m pipeline.index: tests/serve_support.py).
No packet leaves loopback: see tests/serve_support.py.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from models.bundle import ModelBundle
from models.vector_index import VectorIndex
from pipeline.serve import __main__ as serve_command
from pipeline.serve import service as service_module
from pipeline.serve.app import create_app
from pipeline.serve.config import ServeConfig, serve_parser
from pipeline.serve.guard import guarded_socket
from pipeline.serve.similar import MAX_K, THUMBNAIL_SIDE, ThumbnailCache
from tests import serve_support
from tests.conftest import projection_bundle_at
from tests.serve_support import (
    PUBLIC_STAND_IN,
    SIMILAR_PAINTINGS,
    indexed_paintings,
    make_app,
    make_similar_app,
    ready_client,
)
from transforms.images import decode_image

loopback_only = serve_support.loopback_only
image_host = serve_support.image_host

NEIGHBOUR_FIELDS = {"rank", "distance", "same_picture", "id", "uri", "title", "style",
                    "confidence", "label", "thumbnail"}  # fmt: skip


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, projection_bundle):
    return indexed_paintings(tmp_path_factory, projection_bundle)


@pytest.fixture(scope="module")
def guard_calls() -> Counter:
    return Counter()


@pytest.fixture(scope="module")
def client(projection_bundle, indexed, guard_calls):
    """--index, the guard on (its calls counted)."""

    def counted_guard(addr_info: tuple):
        guard_calls[addr_info[4][0]] += 1
        return guarded_socket(addr_info)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service_module, "guarded_socket", counted_guard)
        with ready_client(
            make_similar_app(projection_bundle, indexed.index, max_batch=4)
        ) as client:
            yield client


@pytest.fixture(scope="module")
def open_client(projection_bundle, indexed):
    """--index and --allow_private_urls: URLs on the tests' hosts on 127.0.0.1."""
    app = make_similar_app(projection_bundle, indexed.index, max_batch=4, allow_private_urls=True)
    with ready_client(app) as client:
        yield client


@pytest.fixture
def in_the_catalogs_folder(indexed, monkeypatch):
    """The index's relative URIs are read from the folder the service runs in."""
    monkeypatch.chdir(indexed.folder)


def post_image(client, data: bytes, route: str = "/similar"):
    return client.post(route, content=data, headers={"Content-Type": "image/jpeg"})


def assert_error(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["kind"] == kind and error["message"], error
    return error


# --- POST /similar ----------------------------------------------------------------------------


def test_an_upload_gets_its_prediction_and_the_nearest_paintings_first_itself(client, indexed):
    answer = post_image(client, indexed.image(4), "/similar?k=3").json()
    prediction = post_image(client, indexed.image(4), "/predict").json()

    assert {k: v for k, v in answer.items() if k != "neighbours"}.keys() == prediction.keys()
    assert answer["top_k_styles"] == prediction["top_k_styles"]
    np.testing.assert_allclose(answer["top_k_probabilities"], prediction["top_k_probabilities"],
                               atol=1e-6)  # fmt: skip
    neighbours = answer["neighbours"]
    assert [n["rank"] for n in neighbours] == [1, 2, 3]
    assert all(set(n) == NEIGHBOUR_FIELDS for n in neighbours)
    nearest = neighbours[0]
    items = VectorIndex.load(indexed.index).items.to_pylist()
    assert nearest["uri"] == indexed.uri(4) and nearest["distance"] < 2e-3
    assert [n["same_picture"] for n in neighbours] == [True, False, False]
    found_only = ("rank", "distance", "same_picture", "thumbnail")
    assert {k: v for k, v in nearest.items() if k not in found_only} == items[nearest["id"]]
    assert nearest["title"] == indexed.titles[4]  # the catalog's, as it was written
    assert nearest["thumbnail"] == f"/similar/items/{nearest['id']}/thumbnail"
    distances = [n["distance"] for n in neighbours]
    assert distances == sorted(distances)


def test_a_multipart_upload_and_a_url_find_the_same_neighbours(open_client, indexed, image_host):
    image_host.files["painting.jpg"] = indexed.image(7)
    raw = post_image(open_client, indexed.image(7)).json()
    uploaded = open_client.post("/similar", files={"file": ("p.jpg", indexed.image(7))}).json()
    url = f"{image_host.url}/files/painting.jpg"
    fetched = open_client.post("/similar", json={"url": url}).json()
    assert fetched["url"] == url
    for answer in (uploaded, fetched):
        assert [n["id"] for n in answer["neighbours"]] == [n["id"] for n in raw["neighbours"]]
    assert raw["neighbours"][0]["uri"] == indexed.uri(7)
    assert len(raw["neighbours"]) == 9  # k = 10 by default; the index holds 9


def test_a_url_meets_the_same_guard_as_on_predict(client, image_host, indexed, guard_calls):
    image_host.files["painting.jpg"] = indexed.image(0)
    guard_calls.clear()
    url = f"{image_host.url}/files/painting.jpg"
    assert_error(client.post("/similar", json={"url": url}), 403, "forbidden_address")
    assert guard_calls == Counter({"127.0.0.1": 1}) and image_host.requests == Counter()
    said = assert_error(client.post("/similar", json={"url": "file:///etc/passwd"}), 422,
                        "unsupported_scheme")  # fmt: skip
    assert "only http(s) URLs" in said["message"]


def test_a_body_that_is_not_an_image_and_an_empty_one_are_json_errors(client):
    assert_error(post_image(client, b"not a painting"), 422, "not_an_image")
    assert_error(post_image(client, b""), 422, "empty")
    response = client.post("/similar", content=b"x", headers={"Content-Type": "text/plain"})
    assert (
        "/similar takes application/json"
        in assert_error(response, 415, "unsupported_media_type")["message"]
    )


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("k=0", "k: Input should be greater than or equal to 1"),
        ("k=-3", "k: Input should be greater than or equal to 1"),
        (f"k={MAX_K + 1}", f"k: Input should be less than or equal to {MAX_K}"),
        ("k=many", "k: Input should be a valid integer"),
        ("max_distance=-0.5", "max_distance: Input should be greater than or equal to 0"),
        ("max_distance=nan", "max_distance:"),
    ],
)
def test_k_and_max_distance_are_checked_before_anything_is_read(client, indexed, query, said):
    response = post_image(client, indexed.image(0), f"/similar?{query}")
    assert said in assert_error(response, 422, "invalid_request")["message"]


def test_max_distance_leaves_out_the_farther_paintings(client, indexed):
    everything = post_image(client, indexed.image(1), "/similar?k=9").json()["neighbours"]
    cut = float(np.mean([everything[2]["distance"], everything[3]["distance"]]))
    near = post_image(client, indexed.image(1), f"/similar?k=9&max_distance={cut}").json()
    assert near["neighbours"] == everything[:3]


def test_a_heatmap_comes_with_the_neighbours_when_asked_for(projection_bundle, indexed):
    app = make_similar_app(projection_bundle, indexed.index, max_batch=1, heatmaps=True)
    with ready_client(app) as client:
        answer = post_image(client, indexed.image(2), "/similar?k=2&heatmap=true").json()
    assert answer["heatmap"].startswith("data:image/jpeg;base64,")
    assert answer["neighbours"][0]["uri"] == indexed.uri(2)


def test_the_index_is_described(client, indexed, projection_bundle):
    summary = client.get("/similar/index").json()
    bundle = ModelBundle.load(projection_bundle)
    assert summary == {"model": bundle.id, "embedding": bundle.manifest.embedding.to_json(),
                       "items": len(SIMILAR_PAINTINGS), "search": "exact", "metric": "cosine",
                       "max_k": MAX_K}  # fmt: skip


def test_the_new_routes_are_in_the_schema_and_counted_in_the_metrics(client, indexed):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/similar", "/similar/index", "/similar/items/{item_id}/thumbnail"} <= set(paths)
    post_image(client, indexed.image(0))
    post_image(client, indexed.image(0), "/similar?k=0")
    client.get("/similar/items/999/thumbnail")
    lines = client.get("/metrics").text.splitlines()
    for expected in (
        'artstyle_requests_total{route="/similar",status="200"}',
        'artstyle_requests_total{route="/similar",status="422"}',
        'artstyle_requests_total{route="/similar/items/{item_id}/thumbnail",status="404"}',
        'artstyle_request_seconds_count{route="/similar"}',
    ):
        assert any(line.startswith(expected) for line in lines), expected


# --- Without --index --------------------------------------------------------------------------


def test_without_an_index_the_similar_routes_say_so_in_json(tiny_bundle, indexed):
    with ready_client(make_app(tiny_bundle, max_batch=1)) as client:
        for response in (
            post_image(client, indexed.image(0)),
            client.get("/similar/items/0/thumbnail"),
        ):
            said = assert_error(response, 404, "no_index")
            assert "started without --index" in said["message"]
        described = client.get("/similar/index")
        assert described.status_code == 200 and described.json() is None
        assert client.post("/predict", content=indexed.image(0),
                           headers={"Content-Type": "image/jpeg"}).status_code == 200  # fmt: skip


# --- Thumbnails -------------------------------------------------------------------------------


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_a_thumbnail_is_the_indexed_images_square_as_a_small_jpeg(
    client, indexed, in_the_catalogs_folder
):
    response = client.get(f"/similar/items/{indexed.item(3)}/thumbnail")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    shown = decoded(response.content)
    expected = decode_image(indexed.image(3), size=THUMBNAIL_SIDE)
    assert shown.shape == (THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3)
    blocks = (10, 16, 10, 16, 3)  # JPEG smooths the paintings' noise: compare 16x16 blocks
    difference = shown.reshape(blocks).mean((1, 3)) - expected.reshape(blocks).mean((1, 3))
    assert np.abs(difference).max() < 4
    assert response.headers["cache-control"] == "no-cache"


def test_a_thumbnail_is_kept_and_a_browsers_copy_is_confirmed_without_a_read(
    projection_bundle, indexed, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # copies of two images, taken away once they are shown
    (tmp_path / "images").mkdir()
    for i in (5, 6):
        (tmp_path / indexed.uri(i)).write_bytes(indexed.image(i))
    shown, other = (f"/similar/items/{indexed.item(i)}/thumbnail" for i in (5, 6))
    with ready_client(make_similar_app(projection_bundle, indexed.index, max_batch=1)) as client:
        first = client.get(shown)
        assert first.status_code == 200, first.text
        (tmp_path / indexed.uri(5)).unlink()
        assert client.get(shown).content == first.content  # kept: its file is gone
        not_confirmed = client.get(other, headers={"If-None-Match": first.headers["etag"]})
        assert not_confirmed.status_code == 200, not_confirmed.text  # another item's validator
        assert not_confirmed.headers["etag"] != first.headers["etag"]
        assert len(client.app.state.service.similar.thumbnails) == 2
    with ready_client(make_similar_app(projection_bundle, indexed.index, max_batch=1)) as client:
        for validators in (first.headers["etag"], f'"other", W/{first.headers["etag"]}'):
            confirmed = client.get(shown, headers={"If-None-Match": validators})
            assert confirmed.status_code == 304 and confirmed.content == b""
            assert confirmed.headers["etag"] == first.headers["etag"]
        assert_error(client.get(shown), 502, "not_found")  # so the 304 read nothing


def test_an_unknown_item_is_404_and_an_id_that_is_no_number_422(client):
    for item in (len(SIMILAR_PAINTINGS), 10**12, -1):
        said = assert_error(client.get(f"/similar/items/{item}/thumbnail"), 404, "unknown_item")
        assert f"no item {item}" in said["message"]
    assert_error(client.get("/similar/items/first/thumbnail"), 422, "invalid_request")
    assert_error(client.get("/similar/items/1.5/thumbnail"), 422, "invalid_request")


def test_a_relative_uri_is_read_from_the_folder_the_service_runs_in(
    client, indexed, tmp_path, monkeypatch
):
    thumbnail = f"/similar/items/{indexed.item(0)}/thumbnail"
    monkeypatch.chdir(tmp_path)
    said = assert_error(client.get(thumbnail), 502, "not_found")
    assert indexed.uri(0) in said["message"]
    monkeypatch.chdir(indexed.folder)
    assert client.get(thumbnail).status_code == 200


def test_the_thumbnail_cache_keeps_the_most_recently_used_within_its_bytes():
    cache = ThumbnailCache(max_bytes=10)
    cache.put(1, b"aaaa")
    cache.put(2, b"bbbb")
    assert cache.get(1) == b"aaaa"  # 1 is now the most recently used
    cache.put(3, b"cccc")  # 12 bytes: the least recently used, 2, goes
    assert (cache.get(2), cache.get(1), cache.get(3)) == (None, b"aaaa", b"cccc")
    assert cache.held == 8 and len(cache) == 2
    cache.put(4, b"x" * 11)  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(4) is None and len(cache) == 2
    cache.put(1, b"a")
    assert cache.held == 5


# --- The guard, on the URIs an index names ----------------------------------------------------


def index_of_uris(folder: Path, bundle_path: str, uris: list[str]) -> str:
    """An index of `bundle_path`'s embedding whose items are at `uris` (its vectors, any)."""
    bundle = ModelBundle.load(bundle_path)
    embedding = bundle.manifest.embedding
    assert embedding is not None
    index = VectorIndex.new(bundle.id, embedding)
    vectors = np.random.default_rng(0).normal(size=(len(uris), embedding.dimension))
    index.add(vectors.astype(np.float32), pa.table({"uri": pa.array(uris, pa.string())}))
    index.save(str(folder))
    return str(folder)


REFUSED_ADDRESSES = [
    "http://127.0.0.1:{port}/files/red.png",
    "http://[::1]:{port}/files/red.png",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://10.0.0.1/painting.png",
    "https://192.168.1.1/painting.png",
    "http://loopback.test:{port}/files/red.png",  # a name that resolves to 127.0.0.1
    "http://allowed.test/redirect?to=http://127.0.0.1:{port}/files/red.png",
]
NOT_READ = ["ftp://10.0.0.1/painting.png", "sftp://127.0.0.1/painting.png",
            "zip://painting.png::http://127.0.0.1:{port}/paintings.zip"]  # fmt: skip


@pytest.fixture
def remote_index(tmp_path, projection_bundle, image_host, loopback_only, indexed) -> str:
    """An index whose items are at the URIs above, then a public one, then the private one
    again; "allowed.test" resolves to a public address served by the image host."""
    loopback_only.names |= {"loopback.test": "127.0.0.1", "allowed.test": PUBLIC_STAND_IN}
    loopback_only.stand_ins[PUBLIC_STAND_IN] = ("127.0.0.1", image_host.port)
    image_host.files["red.png"] = indexed.image(6)
    uris = [*REFUSED_ADDRESSES, *NOT_READ, "http://allowed.test/files/red.png"]
    return index_of_uris(
        tmp_path / "remote", projection_bundle, [u.format(port=image_host.port) for u in uris]
    )


def test_an_index_uri_at_a_private_address_is_refused_and_never_reached(
    projection_bundle, remote_index, image_host
):
    with ready_client(make_similar_app(projection_bundle, remote_index, max_batch=1)) as client:
        for item in range(len(REFUSED_ADDRESSES)):
            assert_error(client.get(f"/similar/items/{item}/thumbnail"), 403, "forbidden_address")
        for item in range(len(REFUSED_ADDRESSES), len(REFUSED_ADDRESSES) + len(NOT_READ)):
            said = assert_error(client.get(f"/similar/items/{item}/thumbnail"), 502,
                                "unsupported_scheme")  # fmt: skip
            assert "reads the index's images from local files" in said["message"]
        assert image_host.requests["/files/red.png"] == 0
        public = client.get(f"/similar/items/{len(REFUSED_ADDRESSES) + len(NOT_READ)}/thumbnail")
        assert public.status_code == 200 and image_host.requests["/files/red.png"] == 1
        assert public.headers["content-type"] == "image/jpeg"


def test_with_allow_private_urls_an_index_uri_on_loopback_is_read(
    projection_bundle, remote_index, image_host
):
    app = make_similar_app(projection_bundle, remote_index, max_batch=1, allow_private_urls=True)
    with ready_client(app) as client:
        assert client.get("/similar/items/0/thumbnail").status_code == 200
        assert_error(client.get("/similar/items/7/thumbnail"), 502, "unsupported_scheme")
    assert image_host.requests["/files/red.png"] == 1


def test_an_index_image_that_cannot_be_used_is_502(projection_bundle, tmp_path, image_host):
    (tmp_path / "notes.txt").write_text("not a painting")
    uris = [str(tmp_path / "notes.txt"), str(tmp_path / "missing.png"),
            f"{image_host.url}/files/absent.png"]  # fmt: skip
    index = index_of_uris(tmp_path / "index", projection_bundle, uris)
    app = make_similar_app(projection_bundle, index, max_batch=1, allow_private_urls=True)
    with ready_client(app) as client:
        assert_error(client.get("/similar/items/0/thumbnail"), 502, "not_an_image")
        assert_error(client.get("/similar/items/1/thumbnail"), 502, "not_found")
        assert_error(client.get("/similar/items/2/thumbnail"), 502, "not_found")


# --- Both engines -----------------------------------------------------------------------------


def test_both_engines_find_the_same_neighbours(projection_bundle, indexed):
    """The service as it loads its model with --index, on Keras and on OpenVINO, in float32."""
    found = {}
    for engine in ("keras", "openvino"):
        config = ServeConfig(model=projection_bundle, index=indexed.index, engine=engine,
                             precision="float32", heatmaps=False, max_batch=2)  # fmt: skip
        with ready_client(create_app(config, ModelBundle.load(projection_bundle))) as client:
            found[engine] = [post_image(client, indexed.image(i), "/similar?k=4").json()
                             for i in (0, 5, 8)]  # fmt: skip
            assert client.app.state.service.engine.engine == engine
    for keras, openvino in zip(found["keras"], found["openvino"], strict=True):
        assert [n["id"] for n in keras["neighbours"]] == [n["id"] for n in openvino["neighbours"]]
        np.testing.assert_allclose([n["distance"] for n in keras["neighbours"]],
                                   [n["distance"] for n in openvino["neighbours"]],
                                   atol=1e-4)  # fmt: skip
        assert keras["top_k_styles"] == openvino["top_k_styles"]


# --- python -m pipeline.serve --index ---------------------------------------------------------


def test_the_flag_is_the_similar_commands_declaration():
    from pipeline.flags import INDEX, SIMILAR_COMMAND

    ours = next(a for a in serve_parser()._actions if a.dest == "index")
    theirs = next(a for a in SIMILAR_COMMAND.parser()._actions if a.dest == "index")
    assert ours.option_strings == theirs.option_strings == [INDEX.name]
    assert ours.help.startswith(INDEX.help) and theirs.help == INDEX.help
    assert ours.default is None and not ours.required and theirs.required


@pytest.fixture(scope="module")
def bad_indexes(tmp_path_factory, indexed, tiny_bundle) -> dict[str, tuple[list[str], str]]:
    """Flags that start the service with a bad --index, and what its one line says."""
    import shutil

    folder = tmp_path_factory.mktemp("bad-indexes")
    corrupt = shutil.copytree(indexed.index, folder / "corrupt")
    (vectors,) = corrupt.glob("vectors-*.faiss")
    vectors.write_bytes(b"not faiss")
    manifest = VectorIndex.load(indexed.index).manifest
    VectorIndex.new(manifest.model_id, manifest.embedding).save(str(folder / "empty"))
    other = projection_bundle_at(folder / "other-bundle", model_id="another-model")
    return {
        "missing": ([f"--index={folder / 'nowhere'}"], "is not an index: no such folder"),
        "corrupt": ([f"--index={corrupt}"], "is not a readable FAISS index"),
        "empty": ([f"--index={folder / 'empty'}"], "holds no paintings"),
        "other model": ([f"--index={indexed.index}", f"--model={other}"],
                        "vectors of different models do not compare"),
        "no projection": ([f"--index={indexed.index}", f"--model={tiny_bundle}"],
                          "gives no embeddings"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["missing", "corrupt", "empty", "other model", "no projection"])
def test_a_bad_index_is_one_line_and_status_2_before_the_model_loads(
    case, bad_indexes, projection_bundle, monkeypatch, capsys
):
    flags, said = bad_indexes[case]
    monkeypatch.setattr(serve_command, "check_head", lambda *a: pytest.fail("model loaded"))
    monkeypatch.setattr(serve_command.uvicorn.Server, "run", lambda *a: pytest.fail("served"))
    monkeypatch.setattr(sys, "argv", ["serve", f"--model={projection_bundle}", "--port=0", *flags])
    with pytest.raises(SystemExit) as exited:
        serve_command.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("artstyle: ") and said in err, err


def test_python_m_pipeline_serve_refuses_another_models_index_in_one_line(bad_indexes):
    flags, said = bad_indexes["other model"]
    command = [sys.executable, "-m", "pipeline.serve", "--port=0", *flags]
    served = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert served.returncode == 2, served.stderr
    (line,) = served.stderr.splitlines()
    assert line.startswith("artstyle: ") and said in line and "another-model" in line


def test_the_command_serves_the_index_it_is_given(projection_bundle, indexed, monkeypatch):
    served = {}
    monkeypatch.setattr(serve_command.uvicorn.Server, "run",
                        lambda server, sockets: served.update(app=server.config.app))  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["serve", f"--model={projection_bundle}", "--port=0",
                                      f"--index={indexed.index}"])  # fmt: skip
    serve_command.main()
    service = served["app"].state.service
    assert service.config.index == indexed.index
    assert service.similar.index.size == len(SIMILAR_PAINTINGS)
