"""A prediction run's plan: where its workers run, which engine runs its model, and in which
arithmetic, each with its reason, resolved once from the options before the graph is built.

The graph reads the plan to choose its model's loader, the progress bar to know whether it
can count the images done, and summary.json records its engine and arithmetic: none of
them asks the options again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import partial

from apache_beam.options.pipeline_options import (
    DirectOptions,
    PipelineOptions,
    StandardOptions,
)

from models.bundle import ModelBundle, check_backbone_weights
from models.engine_choice import EngineChoice, choose_engine
from models.openvino_engine import converted_file, openvino_precision_of
from models.precision import PrecisionChoice, choose_precision
from pipeline.options import ModelOptions, PredictOptions

IN_PROCESS_RUNNERS = ("direct", "switchingdirect", "bundlebaseddirect")
LOCAL_RUNNERS = (*IN_PROCESS_RUNNERS, "prism")  # Prism: worker processes on this machine
PER_WORKER = "resolved per worker (see the workers' logs)"


class Workers(Enum):
    """Where a run's workers run, as far as what they resolve or count is concerned."""

    IN_THIS_PROCESS = "in this process"  # Beam's direct runner, in memory or in threads
    ON_THIS_MACHINE = "in processes of this machine"  # multi_processing mode, Prism
    ELSEWHERE = "on other machines"  # Dataflow, a portable runner's job service

    @classmethod
    def of(cls, options: PipelineOptions) -> Workers:
        runner = runner_name(options)
        if runner not in LOCAL_RUNNERS:
            return cls.ELSEWHERE
        mode = options.view_as(DirectOptions).direct_running_mode
        if runner in IN_PROCESS_RUNNERS and mode != "multi_processing":
            return cls.IN_THIS_PROCESS
        return cls.ON_THIS_MACHINE

    @property
    def on_this_machine(self) -> bool:
        """What the workers resolve (an arithmetic measured and cached per machine, whether
        there is a GPU) can be resolved here."""
        return self is not Workers.ELSEWHERE


def runner_name(options: PipelineOptions) -> str:
    """--runner in short and lower case ('direct' when unset, 'dataflow' for DataflowRunner)."""
    return (options.view_as(StandardOptions).runner or "direct").lower().removesuffix("runner")


@dataclass(frozen=True)
class RunPlan:
    """How a run's model runs. `precision` is the arithmetic its workers run in where they
    are on this machine; elsewhere it is the one asked for, which each worker resolves."""

    workers: Workers
    engine: EngineChoice
    precision: PrecisionChoice
    embeddings: bool  # the model gives each image's embedding beside its probabilities


def plan_run(options: PipelineOptions, bundle: ModelBundle) -> RunPlan:
    """The run's plan. The model is checked on the engine chosen before its arithmetic is
    resolved (which may build it): what would stop it in the workers is one line now."""
    workers = Workers.of(options)
    predict_options = options.view_as(PredictOptions)
    engine = choose_engine(predict_options.engine, workers.on_this_machine)
    embeddings = predict_options.embeddings
    check_model(bundle, engine.engine, options.view_as(ModelOptions).backbone_weights, embeddings)
    precision = _precision(options, bundle, engine.engine, workers, embeddings)
    return RunPlan(workers, engine, precision, embeddings)


def check_model(
    bundle: ModelBundle, engine: str, backbone_weights: str | None, embeddings: bool
) -> None:
    """Backbone weights that cannot be the bundle's, a head that Keras refuses, and
    embeddings asked of a bundle that gives none, are one line at start-up. (OpenVINO,
    running files it converted before, needs no check of the head: Keras read it then.)"""
    check_backbone_weights(bundle.manifest.backbone.name, backbone_weights)
    if embeddings:
        bundle.check_embedding()
    if engine == "keras" or not converted_file(bundle, backbone_weights, embeddings).is_file():
        bundle.check_head()


def _precision(
    options: PipelineOptions, bundle: ModelBundle, engine: str, workers: Workers, embeddings: bool
) -> PrecisionChoice:
    """The backbone's arithmetic on `engine`. Workers on this machine run in the one
    resolved here, once (so that none measures again, and perhaps differently); workers
    elsewhere each resolve their own, and log it."""
    asked = options.view_as(PredictOptions).precision
    if not workers.on_this_machine:
        return PrecisionChoice(asked, PER_WORKER)
    model_options = options.view_as(ModelOptions)
    weights, batch_size = model_options.backbone_weights, model_options.batch_size
    if engine == "openvino":
        return openvino_precision_of(bundle.path, weights, asked, batch_size, embeddings)
    return choose_precision(asked, partial(bundle.classifier, weights), bundle.id)
