"""The whole pipeline over a network of faulty hosts: every row comes out, on time."""

import contextlib
import os
import zipfile

import pyarrow.parquet as pq

from pipeline.predict import run
from tests.conftest import COLOURS, painting


def test_a_trickling_host_costs_its_own_row_only(tmp_path, tiny_bundle, faulty_host):
    """One host trickles a byte every half second for ever: the run ends at that row's
    deadline with an error row for it, and the other rows, over HTTP (one after a 503,
    retried) and from disk, are predicted."""
    painting(tmp_path / "local.jpg", COLOURS["Red_Period"], seed=1)
    faulty_host.files["blue.jpg"] = painting(
        tmp_path / "b.jpg", COLOURS["Blue_Period"], 2
    ).read_bytes()
    uris = ["local.jpg", f"{faulty_host.url}/files/blue.jpg", f"{faulty_host.url}/flaky.jpg",
            f"{faulty_host.url}/trickle.jpg"]  # fmt: skip
    (tmp_path / "catalog.csv").write_text("uri\n" + "\n".join(uris) + "\n")
    painting(tmp_path / "flaky.jpg", COLOURS["Green_Period"], 3)

    summary = run([f"--input={tmp_path / 'catalog.csv'}", f"--output={tmp_path / 'out'}",
                   f"--model={tiny_bundle}", "--batch_size=2", "--top_k=3",
                   "--fetch_timeout_s=2"])  # fmt: skip

    rows = pq.read_table(list(map(str, (tmp_path / "out").glob("predictions-*.parquet"))))
    errors = {row["uri"]: row["error"] for row in rows.to_pylist()}
    assert sorted(errors) == sorted(uris)
    assert summary.n_images == 4 and summary.n_errors == 2, errors
    assert errors["local.jpg"] is None and errors[uris[1]] is None
    assert errors[uris[3]].startswith("fetch_failed:") and "timed out after 2 s" in errors[uris[3]]
    assert faulty_host.gets("/flaky.jpg") == 2  # a 503, then the (undecodable) painting
    assert errors[uris[2]].startswith("not_an_image:")


def test_archives_redirects_and_special_files_become_rows_of_their_kinds(
    tmp_path, tiny_bundle, faulty_host
):
    """A member of a zip is predicted; a missing member, a redirect to a local file, a
    device and a FIFO each become an error row of its own kind, at once."""
    archive = tmp_path / "paintings.zip"
    with zipfile.ZipFile(archive, "w") as paintings:
        paintings.write(painting(tmp_path / "red.jpg", COLOURS["Red_Period"], seed=1), "red.jpg")
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    uris = {
        f"zip://red.jpg::{archive}": None,
        f"zip://blue.jpg::{archive}": "not_found",
        f"{faulty_host.url}/redirect.jpg?to=file:///etc/passwd": "fetch_failed",
        "/dev/zero": "not_a_file",
        str(fifo): "not_a_file",
    }
    (tmp_path / "catalog.csv").write_text("uri\n" + "\n".join(uris) + "\n")
    try:
        run([f"--input={tmp_path / 'catalog.csv'}", f"--output={tmp_path / 'out'}",
             f"--model={tiny_bundle}", "--batch_size=2", "--fetch_timeout_s=5"])  # fmt: skip
    finally:
        with contextlib.suppress(OSError):  # a reader left waiting on the FIFO is let go
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    rows = pq.read_table(list(map(str, (tmp_path / "out").glob("predictions-*.parquet"))))
    kinds = {row["uri"]: row["error"] and row["error"].split(":")[0] for row in rows.to_pylist()}
    assert kinds == uris
