"""The loading step: decoding runs ahead of what it emits, and still loses nothing."""

import threading

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.conftest import painting
from transforms import fetch
from transforms.catalog import ImageRecord
from transforms.fetch import FetchPolicy
from transforms.load import LoadImages


def test_every_record_comes_out_once_whatever_the_lookahead(tmp_path):
    """Seven records with two bad ones, through a lookahead of 2: some are emitted from
    process(), the last ones from finish_bundle(); each appears exactly once."""
    uris = [str(painting(tmp_path / f"{i}.jpg", (40 * i, 90, 160), seed=i)) for i in range(5)]
    uris.insert(2, str(tmp_path / "missing.jpg"))
    uris.insert(5, "")
    records = [ImageRecord(uri, uri, None) for uri in uris]
    with TestPipeline() as pipeline:
        loaded = (
            pipeline
            | beam.Create(records, reshuffle=False)
            | LoadImages(size=32, lookahead=2, threads=2)
        )
        images = loaded.images | "Images" >> beam.Map(lambda pair: (pair[0].uri, pair[1].shape))
        errors = loaded.errors | "Errors" >> beam.Map(lambda pair: (pair[0].uri, pair[1][:11]))
        good = [uri for uri in uris if uri and "missing" not in uri]
        assert_that(images, equal_to([(uri, (32, 32, 3)) for uri in good]), label="AllImages")
        assert_that(
            errors,
            equal_to([(uris[2], "not_found: "), ("", "missing_uri")]),
            label="AllErrors",
        )


def test_transient_faults_are_retried_and_lasting_ones_become_error_rows(
    tmp_path, flaky_filesystem, monkeypatch
):
    """Object-store reads that fail once are all retried into images; a store that always
    fails gives error rows; nothing is lost either way."""
    image = painting(tmp_path / "a.jpg", (200, 100, 50), seed=0).read_bytes()
    monkeypatch.setattr(flaky_filesystem, "content", image)
    monkeypatch.setattr(flaky_filesystem, "failures", 1)
    flaky = [f"flakytest://bucket/{i}.jpg" for i in range(6)]
    monkeypatch.setattr(fetch, "BACKOFF_INITIAL_S", 0.01)
    records = [ImageRecord(uri, uri, None) for uri in flaky]
    with TestPipeline() as pipeline:
        loaded = pipeline | beam.Create(records) | LoadImages(size=32, fetch=FetchPolicy())
        uris = loaded.images | "Images" >> beam.Map(lambda pair: pair[0].uri)
        assert_that(uris, equal_to(flaky), label="AllImages")
        assert_that(loaded.errors, equal_to([]), label="NoErrors")

    monkeypatch.setattr(flaky_filesystem, "failures", 100)
    with TestPipeline() as pipeline:
        loaded = pipeline | beam.Create(records) | LoadImages(size=32, fetch=FetchPolicy())
        errors = loaded.errors | "Errors" >> beam.Map(lambda pair: (pair[0].uri, pair[1]))
        assert_that(loaded.images, equal_to([]), label="NoImages")
        expected = "fetch_failed: could not read {}: ConnectionResetError: connection reset "
        expected += "by peer (4 attempts)"
        assert_that(errors, equal_to([(uri, expected.format(uri)) for uri in flaky]))


# What reached the step after loading, in order, and the host to release once all but the
# held image have: module-level, since Beam pickles the step's function by reference.
ARRIVED: list[str] = []
HELD_HOST: dict[str, threading.Event] = {}


def _arrive(pair, *, before_release: int) -> str:
    ARRIVED.append(pair[0].uri)
    if len(ARRIVED) == before_release:
        HELD_HOST["release"].set()
    return pair[0].uri


def test_an_image_that_is_late_holds_back_no_other(tmp_path, faulty_host, monkeypatch):
    """The first record's host answers only once every other image has reached the next
    step: each image goes on as soon as it is decoded, not behind the ones before it (a
    Retry-After, a slow host). In input order the run would wait for the held image's
    deadline, and it would be an error row."""
    names = [f"{i}.jpg" for i in range(6)]
    for i, name in enumerate(names):
        image = painting(tmp_path / name, (40 * i, 90, 160), seed=i)
        faulty_host.files[name] = image.read_bytes()
    uris = [f"{faulty_host.url}/held/{names[0]}"]
    uris += [f"{faulty_host.url}/files/{name}" for name in names[1:]]
    monkeypatch.setitem(HELD_HOST, "release", faulty_host.release)
    ARRIVED.clear()
    records = [ImageRecord(uri, uri, None) for uri in uris]
    with TestPipeline() as pipeline:
        loaded = (
            pipeline
            | beam.Create(records, reshuffle=False)
            | LoadImages(size=32, fetch=FetchPolicy(timeout_s=10))
        )
        arrived = loaded.images | beam.Map(_arrive, before_release=len(uris) - 1)
        assert_that(arrived, equal_to(uris), label="AllImages")
        assert_that(loaded.errors, equal_to([]), label="NoErrors")
    assert ARRIVED[-1] == uris[0], ARRIVED
