"""The Dataflow configuration the README documents builds a valid graph (it is not run here:
that needs a Google Cloud project)."""

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions
from apache_beam.runners.direct.direct_runner import DirectRunner

from models.bundle import ModelBundle
from pipeline.options import CatalogOptions
from pipeline.predict import build_graph
from transforms.catalog import open_catalog

GPU = "type:nvidia-l4;count:1;install-nvidia-driver"

# As in README.md's "On Dataflow" section.
DATAFLOW_ARGS = [
    "--runner=DataflowRunner",
    "--project=my-project",
    "--region=us-central1",
    "--temp_location=gs://my-bucket/tmp",
    "--setup_file=./setup.py",
    "--machine_type=g2-standard-4",
    f"--resource_hints=accelerator={GPU}",
    "--batch_size=128",
]


def test_the_dataflow_gpu_graph_builds_with_the_gpu_on_the_inference_step(tmp_path, tiny_bundle):
    catalog_path = tmp_path / "catalog.csv"
    catalog_path.write_text("uri,style\ngs://my-bucket/paintings/1.jpg,Baroque\n")
    options = PipelineOptions(
        [*DATAFLOW_ARGS, f"--input={catalog_path}", "--output=gs://my-bucket/out"]
    )
    # DataflowRunner itself would contact Google Cloud when constructed: the graph is built
    # on a pipeline object that is never run, with the very same options.
    pipeline = beam.Pipeline(runner=DirectRunner(), options=options)
    catalog = open_catalog(str(catalog_path), uri_column="uri", label_column=None)
    build_graph(pipeline, options, catalog, ModelBundle.load(tiny_bundle))
    proto = pipeline.to_runner_api()

    environments = proto.components.environments
    inference_steps = [
        transform
        for transform in proto.components.transforms.values()
        if transform.unique_name.endswith("RunInference") and transform.environment_id
    ]
    assert inference_steps
    for step in inference_steps:
        hints = environments[step.environment_id].resource_hints
        assert hints["beam:resources:accelerator:v1"] == GPU.encode()
    assert options.view_as(SetupOptions).setup_file == "./setup.py"
    assert options.view_as(CatalogOptions).batch_size == 128
