"""Bundles: the manifest as one typed object both ways, and every broken bundle a one-line
error at start-up, naming the file at fault, without building the model."""

import json
import os
import pickle
import shutil
import zipfile
from functools import partial
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from models.bundle import (
    DEFAULT_BUNDLE,
    BundleError,
    Manifest,
    ModelBundle,
    check_backbone_weights,
    load_classifier,
    save_bundle,
)
from models.settings import VoteConfig
from models.torch_weights import imagenet_weights_path
from models.vote import TrainingVote
from pipeline import explain, report, train
from pipeline.options import run_command
from pipeline.predict import run
from pipeline.serve import __main__ as serve
from tests.conftest import CLASSES, lite0_manifest


def test_the_shipped_manifest_reads_and_writes_back_unchanged():
    data = json.loads(Path(DEFAULT_BUNDLE, "manifest.json").read_text())
    manifest = Manifest.from_json(data, "manifest.json")
    assert manifest.to_json() == data
    assert manifest.backbone.input_size == 224 and len(manifest.classes) == 16
    assert manifest.head.fit["folds"] == 5
    assert manifest.backbone.feature_kind == data["backbone"]["features"]
    assert manifest.scores["val"].top1 == data["scores"]["val"]["top1"]


def test_a_saved_manifest_loads_as_it_was_saved(tiny_bundle):
    assert ModelBundle.load(tiny_bundle).manifest == lite0_manifest("tiny-test-model", CLASSES)


def edit_manifest(bundle, change):
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_head(bundle, keep):
    """head.keras with only the members `keep` says yes to."""
    head = bundle / "head.keras"
    with zipfile.ZipFile(head) as old:
        members = {name: old.read(name) for name in old.namelist() if keep(name)}
    with zipfile.ZipFile(head, "w") as new:
        for name, data in members.items():
            new.writestr(name, data)


def flip_a_byte_halfway(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def broken_copy(source: str, tmp_path: Path, breakage: tuple) -> tuple[Path, str]:
    """A copy of the bundle `source`, broken as `breakage` (a function of the copy's folder,
    and the message expected, `{b}` for that folder) says, and that message."""
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    breaks, message = breakage
    breaks(bundle)
    return bundle, message.format(b=bundle)


BREAKAGES = {
    "no manifest": (lambda b: (b / "manifest.json").unlink(),
                    r"^'{b}' is not a model bundle: it has no manifest.json$"),
    "not JSON": (lambda b: (b / "manifest.json").write_text('{"format": '),
                 r"^{b}/manifest.json is not valid JSON \(Expecting value: line 1 column 12"),
    "not an object": (lambda b: (b / "manifest.json").write_text("[]"),
                      r"^{b}/manifest.json is not a JSON object$"),
    "wrong format": (lambda b: edit_manifest(b, lambda m: m.update(format="other/2")),
                     r"^{b}/manifest.json is not in the artstyle.bundle/1 format$"),
    "missing key": (lambda b: edit_manifest(b, lambda m: m["backbone"].pop("input_size")),
                    r"^{b}/manifest.json has no 'backbone.input_size'$"),
    "wrong type": (lambda b: edit_manifest(b, lambda m: m["backbone"].update(input_size="224")),
                   r"^{b}/manifest.json: 'backbone.input_size' must be a whole number, not '224'$"),
    "unknown backbone": (lambda b: edit_manifest(b, lambda m: m["backbone"].update(name="vgg")),
                         r"^{b}/manifest.json: Unknown backbone 'vgg'; known: "),
    "zero temperature": (lambda b: edit_manifest(b, lambda m: m["head"].update(temperature=0)),
                         r"^{b}/manifest.json: 'head.temperature' must be above 0, not 0$"),
    "a style twice": (lambda b: edit_manifest(b, lambda m: m.update(classes=["a", "a"])),
                      r"^{b}/manifest.json: 'classes' names a style twice$"),
    "head elsewhere": (lambda b: edit_manifest(b, lambda m: m["head"].update(file="../h.keras")),
                       r"^{b}/manifest.json: 'head.file' must name a file in the bundle's folder"),
    "scores without counts": (
        lambda b: edit_manifest(b, lambda m: m.update(scores={"val": {"top1": 0.5}})),
        r"^{b}/manifest.json: 'scores' are not a split's scores \(KeyError\('n_images'\)\)$"),
    "no head": (lambda b: (b / "head.keras").unlink(), r"^{b}/head.keras is missing$"),
    "truncated head": (lambda b: (b / "head.keras").write_bytes(b"PK\x03\x04" + b"\0" * 64),
                       r"^{b}/head.keras is not a readable Keras model file \(.+\)$"),
    "corrupt head": (lambda b: flip_a_byte_halfway(b / "head.keras"),
                     r"^{b}/head.keras is corrupt: model.weights.h5 fails its checksum$"),
    "incomplete head": (lambda b: rewrite_head(b, lambda name: name != "model.weights.h5"),
                        r"^{b}/head.keras is incomplete: it lacks model.weights.h5$"),
}  # fmt: skip


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_bundle_is_a_one_line_error_naming_the_file(tmp_path, tiny_bundle, breakage):
    bundle, message = broken_copy(tiny_bundle, tmp_path, BREAKAGES[breakage])
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(str(bundle))


def test_a_model_that_is_a_file_or_nothing_is_not_a_bundle(tmp_path, tiny_bundle):
    with pytest.raises(BundleError, match="is not a model bundle: it is a file"):
        ModelBundle.load(f"{tiny_bundle}/manifest.json")
    with pytest.raises(BundleError, match="is not a model bundle: no such folder"):
        ModelBundle.load(str(tmp_path / "nothing"))


def test_a_broken_bundle_stops_the_run_before_any_work(tmp_path, tiny_bundle, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    flip_a_byte_halfway(bundle / "head.keras")
    (tmp_path / "catalog.csv").write_text("uri\na.jpg\n")
    argv = [f"--input={tmp_path / 'catalog.csv'}", f"--output={tmp_path / 'out'}",
            f"--model={bundle}"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        run_command(partial(run, argv))
    assert stop.value.code == 2
    expected = f"artstyle: {bundle}/head.keras is corrupt: model.weights.h5 fails its checksum\n"
    assert capsys.readouterr().err == expected
    assert not (tmp_path / "out").exists()


def test_bundle_round_trip_gives_calibrated_probabilities(tiny_bundle):
    bundle = ModelBundle.load(tiny_bundle)
    assert bundle.input_size == 224 and len(bundle.classes) == 3
    classifier = load_classifier(tiny_bundle)
    images = np.random.default_rng(1).uniform(0, 255, (2, 224, 224, 3)).astype(np.float32)
    probabilities = np.asarray(classifier.predict_on_batch(images))
    assert probabilities.shape == (2, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_a_saved_head_keeps_its_weights_in_float16_and_computes_as_before(tmp_path, tiny_bundle):
    """Half the bytes on disk; read back into float32 variables, the head gives the logits of
    its weights rounded to float16, nothing else."""
    bundle = ModelBundle.load(tiny_bundle)
    head = bundle.load_head()
    saved = save_bundle(str(tmp_path / "halved"), bundle.manifest, head).load_head()
    with zipfile.ZipFile(tmp_path / "halved" / bundle.manifest.head.file) as archive:
        archive.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        dtypes = set()
        weights.visititems(lambda name, item: dtypes.add(str(getattr(item, "dtype", ""))))
    assert dtypes - {""} == {"float16"}
    assert all(variable.dtype == "float32" for variable in saved.weights)
    for original, read_back in zip(head.get_weights(), saved.get_weights(), strict=True):
        np.testing.assert_array_equal(read_back, original.astype(np.float16).astype(np.float32))
    features = np.random.default_rng(2).normal(size=(4, head.input_shape[-1])).astype(np.float32)
    np.testing.assert_allclose(
        saved.predict_on_batch(features), head.predict_on_batch(features), rtol=0.02, atol=0.02
    )


def test_a_folder_without_manifest_is_not_a_bundle(tmp_path):
    with pytest.raises(ValueError, match="not a model bundle"):
        ModelBundle.load(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        ModelBundle.load(str(tmp_path))


def replace_head(bundle: Path, inputs: int, outputs: int, lambda_layer: bool = False) -> None:
    """head.keras as a Dense head of other widths, or one with a Python lambda in it (which
    Keras's safe mode refuses to load: it would run code from the file)."""
    features = keras.Input((inputs,))
    hidden = keras.layers.Lambda(lambda x: x * 2)(features) if lambda_layer else features
    keras.Model(features, keras.layers.Dense(outputs)(hidden)).save(bundle / "head.keras")


HEAD_BREAKAGES = {
    "Keras refuses it": (partial(replace_head, inputs=1280, outputs=3, lambda_layer=True),
                         r"^{b}/head.keras: Keras cannot load this head \(ValueError: Requested "
                         r"the deserialization of a `Lambda` layer whose `function` is a Python "
                         r"lambda\)$"),
    "other classes": (partial(replace_head, inputs=1280, outputs=4),
                      r"^{b}/head.keras gives 4 scores; the manifest names 3 classes$"),
}  # fmt: skip


@pytest.mark.parametrize("breakage", HEAD_BREAKAGES)
def test_a_head_keras_cannot_use_is_a_one_line_error_naming_the_file(
    tmp_path, tiny_bundle, breakage
):
    bundle, message = broken_copy(tiny_bundle, tmp_path, HEAD_BREAKAGES[breakage])
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(str(bundle)).check_head()


def test_a_head_over_other_features_is_found_before_it_is_joined_to_the_backbone(
    tmp_path, tiny_bundle
):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    replace_head(bundle, inputs=100, outputs=3)
    message = "its head reads 100 features; efficientnet_lite0's 'pooled' features are 1280"
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(str(bundle)).classifier()


@pytest.mark.parametrize("build", ["classifier", "grad_cam"])
def test_a_vote_over_other_features_is_found_before_it_is_joined_to_the_backbone(
    tmp_path, projection_bundle, build
):
    from models.gradcam import bundle_grad_cam

    bundle = shutil.copytree(projection_bundle, tmp_path / "bundle")
    labels = np.arange(12) % 3
    other = TrainingVote.fitted(np.eye(12, 10, dtype=np.float32), labels, 3, VoteConfig(voters=3))
    other.save(str(bundle / "vote.npz"))
    loaded = ModelBundle.load(str(bundle))
    with pytest.raises(BundleError, match=r"its vote reads 10 features; the head reads 1280$"):
        loaded.classifier() if build == "classifier" else bundle_grad_cam(loaded)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def refused_weights(tmp_path) -> Path:
    """A PyTorch-style file whose pickle would run a shell command."""
    path = tmp_path / "weights.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": _RunsShell(tmp_path / "ran")}))
    return path


def test_backbone_weights_are_checked_without_building_anything(refused_weights, tmp_path):
    lite0 = imagenet_weights_path("efficientnet_lite0")
    check_backbone_weights("efficientnet_lite0", lite0)
    check_backbone_weights("efficientnet_lite0", None)
    refusals = {
        ("efficientnet_lite0", str(refused_weights)):
            r"^--backbone_weights: UnpicklingError: .*weights.pth: refusing to unpickle .*system",
        ("efficientnet_lite0+efficientnet_lite1", lite0):
            r"^--backbone_weights names one backbone's weights; "
            r"efficientnet_lite0\+efficientnet_lite1 is an ensemble",
        ("efficientnet_lite1", lite0):
            r"^--backbone_weights: .*lite0.*\.pth does not hold efficientnet_lite1's weights \(",
        ("efficientnet_lite0", str(tmp_path / "nothing.pth")):
            r"^--backbone_weights: FileNotFoundError: ",
        ("resnet50", lite0): r"^--backbone_weights: .* is not an HDF5 file of Keras weights$",
    }  # fmt: skip
    for (backbone, path), message in refusals.items():
        with pytest.raises(BundleError, match=message):
            check_backbone_weights(backbone, path)
    assert not (tmp_path / "ran").exists()


@pytest.fixture
def broken_models(tmp_path, tiny_bundle, refused_weights) -> dict[str, tuple[list[str], str]]:
    """Flags naming a model that cannot run, and the line each must give."""
    refused_head = tmp_path / "refused-head"
    shutil.copytree(tiny_bundle, refused_head)
    replace_head(refused_head, inputs=1280, outputs=3, lambda_layer=True)
    ensemble = tmp_path / "ensemble"
    shutil.copytree(tiny_bundle, ensemble)
    edit_manifest(
        ensemble, lambda m: m["backbone"].update(name="efficientnet_lite0+efficientnet_lite1")
    )
    return {
        "head Keras refuses": ([f"--model={refused_head}"],
                               f"artstyle: {refused_head}/head.keras: Keras cannot load this head"),
        "weights refused": ([f"--model={tiny_bundle}", f"--backbone_weights={refused_weights}"],
                            f"artstyle: --backbone_weights: UnpicklingError: {refused_weights}: "
                            "refusing to unpickle"),
        "weights for an ensemble": ([f"--model={ensemble}",
                                     f"--backbone_weights={imagenet_weights_path('efficientnet_lite0')}"],
                                    "artstyle: --backbone_weights names one backbone's weights"),
    }  # fmt: skip


def _serve_without_listening(argv: list[str], monkeypatch) -> None:
    def started(*args, **kwargs):
        raise AssertionError("the service started")

    monkeypatch.setattr(serve.uvicorn, "run", started)
    monkeypatch.setattr("sys.argv", ["serve", *argv, "--port=0"])
    serve.serve()


COMMANDS = {
    "predict": lambda argv, out, monkeypatch: run(
        [f"--input={out}/no-catalog.csv", f"--output={out}", *argv]
    ),
    "explain": lambda argv, out, monkeypatch: explain.run(
        [f"{out}/x.jpg", f"--output={out}", *argv]
    ),
    "report": lambda argv, out, monkeypatch: report.run([str(out), *argv]),
    "serve": lambda argv, out, monkeypatch: _serve_without_listening(argv, monkeypatch),
    "train": lambda argv, out, monkeypatch: train.run(
        [f"--input={out}/no-catalog.csv", f"--output={out}", "--backbone=efficientnet_lite0",
         *argv]
    ),
}  # fmt: skip
TAKES = {  # what each command is given: serve has no --backbone_weights, train no --model
    "predict": ("head Keras refuses", "weights refused", "weights for an ensemble"),
    "explain": ("head Keras refuses", "weights refused", "weights for an ensemble"),
    "report": ("head Keras refuses", "weights refused", "weights for an ensemble"),
    "serve": ("head Keras refuses",),
    "train": ("weights refused",),
}


@pytest.mark.parametrize(
    ("command", "breakage"), [(c, b) for c, breakages in TAKES.items() for b in breakages]
)
def test_every_command_stops_a_model_that_cannot_run_in_one_line_before_any_work(
    command, breakage, broken_models, tmp_path, monkeypatch, capsys
):
    argv, line = broken_models[breakage]
    if command == "train":  # its backbone is a flag; no bundle
        argv = [flag for flag in argv if not flag.startswith("--model=")]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_command(partial(COMMANDS[command], argv, out, monkeypatch))
    err = capsys.readouterr().err
    assert (stop.value.code, err.count("\n"), err[: len(line)]) == (2, 1, line), err
    assert not out.exists()


PART_BREAKAGES = {
    "no fingerprint": (lambda b: (b / "fingerprint.npz").unlink(),
                       r"^{b}/fingerprint.npz is missing$"),
    "damaged fingerprint": (lambda b: (b / "fingerprint.npz").write_bytes(b"PK\x03\x04junk"),
                            r"^{b}/fingerprint.npz is not a readable fingerprint \(.+\)$"),
    "another dimension": (
        lambda b: edit_manifest(b, lambda m: m["embedding"].update(dimension=40,
                                                                   fingerprint_dimension=29)),
        r"^{b}/fingerprint.npz has 12 dimensions; the manifest's embedding says 29$"),
    "an embedding of old": (
        lambda b: edit_manifest(b, lambda m: m["embedding"].update(kind="head_projection")),
        r"^'{b}': its embedding is 'head_projection', which this version does not compute"),
    "no vote": (lambda b: (b / "vote.npz").unlink(),
                      r"^{b}/vote.npz is missing$"),
    "damaged vote": (lambda b: (b / "vote.npz").write_bytes(b"PK\x03\x04junk"),
                           r"^{b}/vote.npz is not a readable vote file \(.+\)$"),
    "a vote elsewhere": (
        lambda b: edit_manifest(b, lambda m: m["vote"].update(file="../vote.npz")),
        r"'vote.file' must name a file in the bundle's folder$"),
    "a vote of other styles": (
        lambda b: edit_manifest(b, lambda m: m["classes"].append("Blue_Period_II")),
        r"^{b}/vote.npz votes for 3 styles; the manifest names 4$"),
}  # fmt: skip


@pytest.mark.parametrize("breakage", PART_BREAKAGES)
def test_a_bundle_whose_embedding_or_vote_cannot_be_made_is_one_line_at_load(
    tmp_path, projection_bundle, breakage
):
    bundle, message = broken_copy(projection_bundle, tmp_path, PART_BREAKAGES[breakage])
    with pytest.raises(BundleError, match=message):
        ModelBundle.load(str(bundle))


def test_a_bundle_with_an_embedding_is_saved_with_its_fingerprint_only(tmp_path, tiny_bundle):
    manifest = ModelBundle.load(tiny_bundle).manifest
    head = ModelBundle.load(tiny_bundle).load_head()
    with_embedding = Manifest.from_json(
        {**manifest.to_json(), "embedding": {"dimension": 20, "kind": "style_and_fingerprint",
                                             "fingerprint_dimension": 9}},
        "here",
    )  # fmt: skip
    with pytest.raises(ValueError, match="a bundle with an embedding has a fingerprint"):
        save_bundle(str(tmp_path / "b"), with_embedding, head)
