"""The classifier on OpenVINO's CPU plugin (`--engine openvino`, and `auto` on a CPU):
Keras's numbers without TensorFlow in the process.

Keras's float32 classifier, traced and converted by OpenVINO, computes the same function:
on `val` the same top-1 and top-3 for every painting, its probabilities equal to within
rounding, at about Keras's float32 speed (docs/benchmarks.md). In bfloat16 it is run as
Keras's mixed policy runs it, the backbone rounded and the head in float32
(`split_at_head`), and gives Keras's bfloat16 scores on `val`. Which of the two `auto`
picks follows Keras's rule, with OpenVINO's own measurement where the CPU leaves doubt.

A process that imports Beam and OpenVINO instead of TensorFlow starts seconds sooner and
holds about half the memory. The conversion itself needs TensorFlow, so it runs once per
bundle and machine: its files are kept in the user's cache folder (the weights in float32),
and OpenVINO keeps the kernels it compiles beside them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from models.bundle import MANIFEST_FILE, ModelBundle
from models.cache import cache_dir
from models.fingerprint import FINGERPRINT_FILE
from models.precision import PrecisionChoice, Speedup, measured_speedup, resolve_precision
from models.settings import CENTRE_POOLED

if TYPE_CHECKING:
    import keras
    import openvino

CONVERTED_FILE = "classifier.xml"  # and classifier.bin beside it, the weights
HEAD_NAME = "style_head"  # the Keras head's name, in the converted model's node names
_HINTS = {"float32": "f32", "bfloat16": "bf16"}  # OpenVINO's INFERENCE_PRECISION_HINT
# OpenVINO pins its threads to cores by default: on a machine whose cores other processes
# share, a pinned thread waits for its core instead of moving, and runs much slower.
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}
TELEMETRY_MODULE = "openvino_telemetry"


def imported_openvino() -> ModuleType:
    """OpenVINO, without its telemetry: every `import openvino` here goes through this.

    Importing openvino imports its model converter, which sends usage events to Google
    Analytics (and keeps a client id in ~/intel) unless the user has opted out, each from a
    process it forks for the purpose. artstyle contacts nothing it was not asked to; and a
    process forked from a Beam worker while gRPC's threads hold their locks aborts inside
    them ("RAW: Check ... failed: Mutex::Fer with pending CondVar queueing" on the run's
    stderr). Where the telemetry package cannot be imported, the converter uses its own
    stub, which sends nothing and forks nothing.
    """
    if TELEMETRY_MODULE not in sys.modules:
        sys.modules[TELEMETRY_MODULE] = None  # type: ignore[assignment]  # import fails, by design
    import openvino

    return openvino


class OpenVinoClassifier:
    """A classifier compiled by OpenVINO, run as Keras's is: `predict_on_batch(images)`,
    images of any numeric type (Keras casts them itself; OpenVINO wants float32), gives the
    probabilities, or a list of the model's outputs where it has several (the probabilities
    and the embeddings). In bfloat16 it runs in two stages, see `split_at_head`."""

    def __init__(self, stages: Sequence[Any]):
        self._stages = stages

    def predict_on_batch(self, images: np.ndarray) -> Any:  # an array, or a list of arrays
        values: Any = images.astype(np.float32, copy=False)
        for stage in self._stages[:-1]:
            values = _outputs(stage(values))  # the next stage's inputs, in order
        outputs = _outputs(self._stages[-1](values))
        return outputs[0] if len(outputs) == 1 else outputs


def _outputs(results: Any) -> list[np.ndarray]:
    return [results[i] for i in range(len(results))]


def openvino_precision(
    precision: str, speedup: Speedup | None = None, model_id: str = ""
) -> PrecisionChoice:
    """Keras's rule (models.precision) for the CPU OpenVINO runs on, with OpenVINO's own
    measurement where the CPU leaves doubt: its kernels are not TensorFlow's, and neither
    is their speed in bfloat16. Cached apart from Keras's."""
    return resolve_precision(precision, speedup, f"openvino/{model_id}", cpu_only=True)


def load_openvino_classifier(
    bundle_path: str,
    backbone_weights: str | None,
    precision: str,
    batch_size: int,
    embeddings: bool = False,
) -> OpenVinoClassifier:
    """Module-level, so that RunInference can pickle it as the model loader. Compiled for
    batches of exactly `batch_size` images, the only shape the pipeline's handler sends
    (faster than a batch size left open). Where `auto` measures, the classifier measured in
    the chosen precision is the one returned. With `embeddings`, it gives each image's
    embedding beside its probabilities, as ModelBundle.classifier does."""
    build, choice = _resolved(bundle_path, backbone_weights, precision, batch_size, embeddings)
    logging.info("artstyle: OpenVINO, %s (--precision=%s)", choice, precision)
    return build(choice.precision)


def openvino_precision_of(
    bundle_path: str,
    backbone_weights: str | None,
    precision: str,
    batch_size: int,
    embeddings: bool = False,
) -> PrecisionChoice:
    """The precision `load_openvino_classifier` runs in on this machine, for summary.json:
    measured now where it must be (and cached, so the loader measures nothing again)."""
    return _resolved(bundle_path, backbone_weights, precision, batch_size, embeddings)[1]


def _resolved(
    bundle_path: str,
    backbone_weights: str | None,
    precision: str,
    batch_size: int,
    embeddings: bool,
) -> tuple[Callable[[str], OpenVinoClassifier], PrecisionChoice]:
    """The bundle's classifier, ready to compile in either precision, and the one chosen;
    nothing is compiled unless a measurement needs it."""
    openvino = imported_openvino()
    bundle = ModelBundle.load(bundle_path)
    core = openvino.Core()
    keep_compiled_kernels(core)
    model = classifier_model(core, bundle, backbone_weights, embeddings)
    model.reshape([batch_size, bundle.input_size, bundle.input_size, 3])
    build = cache(partial(compiled_classifier, core, model))
    image_shape = (bundle.input_size, bundle.input_size, 3)
    measure = partial(measured_speedup, build, batch_size, input_shape=image_shape)
    return build, openvino_precision(precision, measure, bundle.id)


def compiled_classifier(
    core: openvino.Core, model: openvino.Model, precision: str
) -> OpenVinoClassifier:
    """`model` compiled in `precision`: float32 whole, or bfloat16 up to the head and the
    head in float32."""
    if precision == "float32":
        return OpenVinoClassifier([compiled_on_a_thread_of_its_own(core, model, "float32")])
    backbone, head = split_at_head(model)
    stages = [
        compiled_on_a_thread_of_its_own(core, backbone, "bfloat16"),
        compiled_on_a_thread_of_its_own(core, head, "float32"),
    ]
    return OpenVinoClassifier(stages)


def split_at_head(model: openvino.Model) -> tuple[openvino.Model, openvino.Model]:
    """The classifier cut where its head begins: the backbone with its features (and, in a
    classifier that gives embeddings, each backbone's `centre_pooled` map, the fingerprint's
    source), and the head with its softmax (and the embedding). Keras's bfloat16 rounds
    the first alone; OpenVINO's, given the whole model, rounded the head too, and moved the
    scores on `val` further from float32's than Keras's do. Cut, it gives Keras's bfloat16
    scores."""
    openvino = imported_openvino()
    model = model.clone()
    ops = model.get_ordered_ops()
    first = next(
        (op for op in ops
         if HEAD_NAME in op.get_friendly_name() and op.get_type_name() == "MatMul"),
        None,
    )  # fmt: skip
    if first is None:
        raise ValueError(f"The converted model has no {HEAD_NAME!r} to keep in float32")
    sources = [
        op.output(0)
        for op in ops
        if CENTRE_POOLED in op.get_friendly_name() and op.get_type_name() == "ReduceMean"
    ]
    cuts = [first.input_value(0), *sources]
    head_inputs = []
    for number, cut in enumerate(cuts):
        name = "features" if number == 0 else f"fingerprint_source_{number}"
        head_input = openvino.opset13.parameter(
            cut.get_partial_shape(), cut.get_element_type(), name=name
        )
        for reader in cut.get_target_inputs():
            reader.replace_source_output(head_input.output(0))
        head_inputs.append(head_input)
    backbone = openvino.Model(cuts, model.get_parameters(), "backbone")
    return backbone, openvino.Model(model.get_results(), head_inputs, "head")


def compiled_on_a_thread_of_its_own(
    core: openvino.Core, model: openvino.Model, precision: str
) -> openvino.CompiledModel:
    """OpenVINO's CPU plugin gives the thread that compiles a signal stack of its own, and
    unmaps it when the compiled model is freed, whichever thread frees it: a thread that
    compiled and lives on (the main one, where Ctrl-C lands) would be left with a stack
    that is gone, and its next signal would kill the process silently. So the compiling is
    done on a thread that ends with it."""
    config = {**OPENVINO_CONFIG, "INFERENCE_PRECISION_HINT": _HINTS[precision]}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="openvino-compile") as thread:
        return thread.submit(core.compile_model, model, "CPU", config).result()


def keep_compiled_kernels(core: openvino.Core) -> None:
    """OpenVINO keeps the kernels it compiles for this CPU in the cache folder, which
    shortens every later run's start; where that folder cannot be made, it compiles them
    each time."""
    folder = cache_dir() / "openvino" / "compiled"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        logging.warning("artstyle: cannot keep OpenVINO's compiled kernels: %s", error)
        return
    core.set_property({"CACHE_DIR": str(folder)})


def classifier_model(
    core: openvino.Core,
    bundle: ModelBundle,
    backbone_weights: str | None,
    embeddings: bool = False,
) -> openvino.Model:
    """The bundle's classifier for OpenVINO (with `embeddings`, the one with two outputs):
    read from the cache, or converted (TensorFlow loads) and cached for the next run. A
    cache that cannot be written costs a conversion per run, never a failed run."""
    converted = converted_file(bundle, backbone_weights, embeddings)
    if converted.is_file():
        return core.read_model(converted)
    logging.info("artstyle: converting %s for OpenVINO, once on this machine", bundle.id)
    classifier = bundle.classifier(backbone_weights, "float32", embeddings=embeddings)
    model = converted_model(classifier)
    try:
        save_converted(model, converted.parent)
    except OSError as error:
        logging.warning("artstyle: cannot cache the converted model: %s", error)
    return model


def converted_file(
    bundle: ModelBundle, backbone_weights: str | None, embeddings: bool = False
) -> Path:
    """Where the bundle's converted classifier is kept (it may not be there yet). Its being
    there also says that Keras read the bundle's head as it is now."""
    key = conversion_key(bundle, backbone_weights, embeddings)
    return cache_dir() / "openvino" / key / CONVERTED_FILE


def conversion_key(
    bundle: ModelBundle, backbone_weights: str | None, embeddings: bool = False
) -> str:
    """What the converted files depend on: the bundle's manifest, head and vote files as
    they are now (fsspec's `ukey`: size and modification time, or an object store's
    checksum), the backbone weights' file if one is named, the libraries that build and
    convert, and whether the classifier gives embeddings too (another model, with two
    outputs)."""
    files = [f"{bundle.path}/{MANIFEST_FILE}", f"{bundle.path}/{bundle.manifest.head.file}"]
    files += [f"{bundle.path}/{FINGERPRINT_FILE}"] if embeddings else []
    files += [f"{bundle.path}/{bundle.manifest.vote['file']}"] if bundle.manifest.vote else []
    files += [backbone_weights] if backbone_weights else []
    parts = [bundle.id]
    for path in files:
        fs, local_path = fsspec.core.url_to_fs(path)
        parts.append(fs.ukey(local_path))
    parts += [metadata.version(name) for name in ("artstyle", "keras", "openvino")]
    parts += ["embeddings"] if embeddings else []
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def converted_model(model: keras.Model) -> openvino.Model:
    """A Keras model's traced TensorFlow graph, converted by OpenVINO (its TensorFlow front
    end reads a concrete function directly: no file in between)."""
    import tensorflow as tf

    openvino = imported_openvino()

    spec = tf.TensorSpec((None, *model.input.shape[1:]), tf.float32)
    traced = tf.function(lambda images: model(images, training=False))
    # Copied weights: shared ones would point into TensorFlow's variables, which TensorFlow
    # may move or free once the Keras model is gone (OpenVINO's own examples copy them too).
    return openvino.convert_model(traced.get_concrete_function(spec), share_weights=False)


def save_converted(model: openvino.Model, folder: Path) -> None:
    """Written into a temporary folder beside `folder` and renamed: another process sees no
    folder or a whole one. Where another process renamed its own first, that one stays."""
    openvino = imported_openvino()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        # Weights stay float32: OpenVINO's default halves them, and changes the results.
        openvino.save_model(model, str(staging / CONVERTED_FILE), compress_to_fp16=False)
        try:
            os.rename(staging, folder)
        except OSError:
            if not (folder / CONVERTED_FILE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
