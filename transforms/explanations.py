"""The report's pictures: a few prediction rows, sampled, each shown with its Grad-CAM, and
the paintings of the likely duplicates it lists, shown as they are.

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
DUPLICATES = "duplicates"  # the paintings of likely duplicates: pictured, not explained


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
    Grad-CAM overlay for the predicted style (none in the DUPLICATES section); or `error`
    where the image cannot be read again. File names are digests of model, URI and style:
    the same row, explained again, writes the same file.
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
                sample |= self._write_pictures(row, images[index], heatmaps.get(index))
            yield sample | {"error": failures.get(index)}

    def _heatmaps(
        self, images: dict[int, np.ndarray], batch: list[tuple[str, dict]]
    ) -> dict[int, np.ndarray]:
        """Grad-CAM of the images read, for each row's predicted style, by batch index (of
        the rows to explain: not those of DUPLICATES)."""
        explained_rows = [i for i in images if batch[i][0] != DUPLICATES]
        if not explained_rows:
            return {}
        styles = np.array([self._classes.index(batch[i][1]["style"]) for i in explained_rows])
        explained = self._grad_cam(np.stack([images[i] for i in explained_rows]), styles)
        return dict(zip(explained_rows, explained.heatmaps, strict=True))

    def _write_pictures(
        self, row: dict, image: np.ndarray, heatmap: np.ndarray | None
    ) -> dict[str, str]:
        key = f"{self._model_id}\n{row['uri']}\n{row['style']}".encode()
        name = hashlib.sha256(key).hexdigest()[:20]
        pictures = {"image": (f"{name}.jpg", image)}
        if heatmap is not None:
            pictures["gradcam"] = (f"{name}-gradcam.jpg", overlay(image, heatmap))
        for file_name, pixels in pictures.values():
            with fsspec.open(f"{self._files_dir}/{file_name}", "wb") as file:
                file.write(jpeg(pixels))
        return {kind: file_name for kind, (file_name, _) in pictures.items()}


def _shown_columns(row: dict[str, Any]) -> dict[str, Any]:
    row = with_current_names(row)
    return {
        key: row.get(key)
        for key in ("uri", "label", "style", "confidence", "top_k_styles", "top_k_probabilities")
    }


class ExplainSamples(beam.PTransform):
    """Prediction rows -> sample dicts (see ExplainRowsFn) of the rows SampleRows picks, and
    of the `duplicates` rows (in the DUPLICATES section)."""

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
        duplicates: Sequence[dict[str, Any]] = (),
    ):
        """`catalog`: the run's, where the sampled rows' images are found (without it, URIs
        are read as they are); `fetch_policy` and `max_pixels`: the run's, so that the
        images read again are read as they were; `duplicates`: rows (`uri`, `style` and
        what a sample shows of them) of the likely duplicates the report lists."""
        super().__init__()
        self._catalog = catalog
        self._duplicates = [(DUPLICATES, dict(row)) for row in duplicates]
        self._sample = SampleRows(bundle.classes, labelled, count, per_style)
        self._explain = ExplainRowsFn(
            bundle.path,
            backbone_weights,
            files_dir,
            fetch_policy or FetchPolicy(),
            max_pixels,
        )

    def expand(self, rows: beam.PCollection[dict]) -> beam.PCollection[dict]:
        explained = rows | "Sample" >> self._sample
        duplicates = rows.pipeline | "Duplicates" >> beam.Create(self._duplicates)
        sampled = (explained, duplicates) | "Pictured" >> beam.Flatten()
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
