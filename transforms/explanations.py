"""The report's pictures: a few prediction rows, sampled, each shown with its Grad-CAM.

Only the sampled rows are explained (Grad-CAM costs a forward and a backward pass of the
float32 model, several times a prediction), so the cost of a report does not grow with
the collection: sampling is a Beam combiner, the same on a hundred rows or ten million.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
import fsspec
import numpy as np

from models.bundle import ModelBundle
from models.gradcam import BATCH_SIZE, bundle_grad_cam, overlay
from transforms.catalog import Catalog, ImageRecord, ReadCatalog
from transforms.fetch import BackgroundFetcher, FetchPolicy
from transforms.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, describe, jpeg
from transforms.predictions import with_current_names

# The report's sections of sampled rows.
CONFIDENT_MISTAKES = "confident_mistakes"  # labelled: wrong, most confident first
LEAST_CONFIDENT = "least_confident"  # labelled: right or wrong, least confident first
GALLERY = "gallery"  # unlabelled: each predicted style's most confident paintings


def by_confidence(row: dict[str, Any]) -> tuple[float, str]:
    """Sampling order: confidence, ties broken by URI, so a report is reproducible."""
    return row["confidence"], row["uri"]


def is_known_mistake(row: dict[str, Any], classes: Sequence[str]) -> bool:
    return row.get("label") in classes and row["style"] != row["label"]


class SampleRows(beam.PTransform):
    """Prediction rows -> (section, row) for the rows a report shows.

    With labels: the `count` most confident mistakes (rows whose label the model knows)
    and the `count` least confident predictions. Without: the `per_style` most confident
    paintings of each predicted style.
    """

    def __init__(self, classes: Sequence[str], labelled: bool, count: int, per_style: int):
        super().__init__()
        self._classes = tuple(classes)
        self._labelled = labelled
        self._count = count
        self._per_style = per_style

    def expand(self, rows: beam.PCollection[dict]) -> beam.PCollection[tuple[str, dict]]:
        predicted = rows | "Predicted" >> beam.Filter(lambda row: row["error"] is None)
        if not self._labelled:
            return (
                predicted
                | "ByStyle" >> beam.WithKeys(lambda row: row["style"])
                | "MostConfidentPerStyle"
                >> beam.combiners.Top.PerKey(self._per_style, key=by_confidence)
                | "Gallery"
                >> beam.FlatMap(lambda style_rows: [(GALLERY, r) for r in style_rows[1]])
            )
        mistakes = (
            predicted
            | "Mistakes" >> beam.Filter(is_known_mistake, self._classes)
            | "MostConfident" >> beam.combiners.Top.Of(self._count, key=by_confidence)
            | "ConfidentMistakes"
            >> beam.FlatMap(lambda top: [(CONFIDENT_MISTAKES, r) for r in top])
        )
        uncertain = (
            predicted
            | "LeastConfident"
            >> beam.combiners.Top.Of(self._count, key=by_confidence, reverse=True)
            | "Uncertain" >> beam.FlatMap(lambda top: [(LEAST_CONFIDENT, r) for r in top])
        )
        return (mistakes, uncertain) | "Samples" >> beam.Flatten()


class ExplainRowsFn(beam.DoFn):
    """Batches of (section, row) -> one sample dict per row, its pictures written as JPEGs.

    Each sample has the row's uri, label, style, confidence and top styles, and `image` and
    `gradcam`: file names under `files_dir` of the painting as the model saw it and of its
    Grad-CAM overlay for the predicted style; or `error` where the image cannot be read
    again. File names are digests of model, URI and style: the same row, explained again,
    writes the same file.
    """

    def __init__(
        self,
        bundle_path: str,
        backbone_weights: str | None,
        files_dir: str,
        fetch_policy: FetchPolicy,
        max_pixels: int,
    ):
        self._bundle_path = bundle_path
        self._backbone_weights = backbone_weights
        self._files_dir = files_dir.rstrip("/")
        self._fetch_policy = fetch_policy
        self._max_pixels = max_pixels

    def setup(self) -> None:
        bundle = ModelBundle.load(self._bundle_path)
        self._model_id = bundle.id
        self._classes = bundle.classes
        self._size = bundle.input_size
        self._grad_cam = bundle_grad_cam(bundle, self._backbone_weights)
        self._fetcher = BackgroundFetcher(self._fetch_policy)

    def teardown(self) -> None:
        self._fetcher.close()

    def process(
        self, batch: list[tuple[str, dict]], locations: dict[str, str]
    ) -> Iterator[dict[str, Any]]:
        """`locations`: where each sampled row's image is, by its URI as the catalog wrote
        it (relative URIs resolved against their own catalog file's folder)."""
        fetches = [self._fetcher.submit(locations.get(row["uri"], row["uri"])) for _, row in batch]
        images, failures = {}, {}
        for index, fetch in enumerate(fetches):
            try:
                data = fetch.result()
                images[index] = decode_image(data, size=self._size, max_pixels=self._max_pixels)
            except ImageError as error:
                failures[index] = str(error)
            except Exception as error:  # a library surprise: still one sample, not a crash
                failures[index] = f"internal: {describe(error)}"
        heatmaps = self._heatmaps(images, batch)
        for index, (section, row) in enumerate(batch):
            sample = {"section": section, **_shown_columns(row), "image": None, "gradcam": None}
            if index in images:
                sample |= self._write_pictures(row, images[index], heatmaps[index])
            yield sample | {"error": failures.get(index)}

    def _heatmaps(
        self, images: dict[int, np.ndarray], batch: list[tuple[str, dict]]
    ) -> dict[int, np.ndarray]:
        """Grad-CAM of the images read, for each row's predicted style, by batch index."""
        if not images:
            return {}
        styles = np.array([self._classes.index(batch[i][1]["style"]) for i in images])
        explained = self._grad_cam(np.stack(list(images.values())), styles)
        return dict(zip(images, explained.heatmaps, strict=True))

    def _write_pictures(self, row: dict, image: np.ndarray, heatmap: np.ndarray) -> dict[str, str]:
        key = f"{self._model_id}\n{row['uri']}\n{row['style']}".encode()
        name = hashlib.sha256(key).hexdigest()[:20]
        names = {"image": f"{name}.jpg", "gradcam": f"{name}-gradcam.jpg"}
        for kind, pixels in (("image", image), ("gradcam", overlay(image, heatmap))):
            with fsspec.open(f"{self._files_dir}/{names[kind]}", "wb") as file:
                file.write(jpeg(pixels))
        return names


def _shown_columns(row: dict[str, Any]) -> dict[str, Any]:
    row = with_current_names(row)
    return {
        key: row.get(key)
        for key in ("uri", "label", "style", "confidence", "top_k_styles", "top_k_probabilities")
    }


class ExplainSamples(beam.PTransform):
    """Prediction rows -> sample dicts (see ExplainRowsFn) of the rows SampleRows picks."""

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        labelled: bool,
        files_dir: str,
        catalog: Catalog | None = None,
        backbone_weights: str | None = None,
        fetch_policy: FetchPolicy | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        count: int,
        per_style: int,
    ):
        """`catalog`: the run's, where the sampled rows' images are found (without it, URIs
        are read as they are); `fetch_policy` and `max_pixels`: the run's, so that the
        images read again are read as they were."""
        super().__init__()
        self._catalog = catalog
        self._sample = SampleRows(bundle.classes, labelled, count, per_style)
        self._explain = ExplainRowsFn(
            bundle.path,
            backbone_weights,
            files_dir,
            fetch_policy or FetchPolicy(),
            max_pixels,
        )

    def expand(self, rows: beam.PCollection[dict]) -> beam.PCollection[dict]:
        sampled = rows | "Sample" >> self._sample
        locations = beam.pvalue.AsDict(self._locations(rows.pipeline, sampled))
        return (
            sampled
            | "Spread" >> beam.Reshuffle()
            | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=BATCH_SIZE)
            | "GradCam" >> beam.ParDo(self._explain, locations=locations)
        )

    def _locations(
        self, pipeline: beam.Pipeline, sampled: beam.PCollection[tuple[str, dict]]
    ) -> beam.PCollection[tuple[str, str]]:
        """(uri, location) of the sampled rows, from the catalog read again: only it knows
        which of its files, and so which folder, each row came from."""
        if self._catalog is None:
            return pipeline | "NoCatalog" >> beam.Create([])
        uris = sampled | "SampledUris" >> beam.Map(lambda sample: sample[1]["uri"])
        return (
            pipeline
            | "ReadCatalog" >> ReadCatalog(self._catalog)
            | "SampledOnly" >> beam.Filter(_is_sampled, uris=beam.pvalue.AsList(uris))
            | "Locations" >> beam.Map(lambda record: (record.uri, record.location))
        )


def _is_sampled(record: ImageRecord, uris: list[str]) -> bool:
    return record.uri in uris
