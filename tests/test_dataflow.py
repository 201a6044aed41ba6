"""The Dataflow job, built offline as a user's dry run (`--template_location`), as the
README documents it: every figure the job carries is read back from what Beam wrote.

No test here reaches any other host: the endpoint is localhost, authentication is off,
staging is a local folder, and any connection off this machine fails the test.
"""

import json
import re
import socket
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from apache_beam.portability.api import beam_runner_api_pb2

from models.bundle import DEFAULT_BUNDLE
from pipeline.predict import run

pytest.importorskip(
    "apache_beam.runners.dataflow.internal.apiclient", reason="needs the [gcp] extra"
)

REPO = Path(__file__).resolve().parent.parent
GPU = "type:nvidia-l4;count:1;install-nvidia-driver"
WORKER_IMAGE = "us-central1-docker.pkg.dev/my-project/artstyle/worker:0.1.0"

# As in README.md's "On Dataflow" section.
DATAFLOW_ARGS = [
    "--runner=DataflowRunner",
    "--project=my-project",
    "--region=us-central1",
    "--temp_location=gs://my-bucket/tmp",
    f"--setup_file={REPO / 'setup.py'}",
    "--machine_type=g2-standard-4",
    f"--resource_hints=accelerator={GPU}",
    "--experiments=no_use_multiple_sdk_containers",
    "--batch_size=128",
    "--input=gs://my-bucket/catalog-*.parquet",
    "--output=gs://my-bucket/out",
]


@contextmanager
def offline() -> Iterator[None]:
    """Connections to anything but this machine fail the test."""
    connect = socket.socket.connect

    def loopback_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost") and not str(host).startswith("/"):
            pytest.fail(f"the job's build tried to reach {address}")
        return connect(sock, address)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", loopback_only)
        yield


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[dict, Path]:
    """The job JSON and the staging folder of one offline build, with a worker image."""
    folder = tmp_path_factory.mktemp("dataflow")
    (folder / "empty_sdk").write_bytes(b"")
    (folder / "staging").mkdir()
    with offline():
        run([*DATAFLOW_ARGS, f"--sdk_container_image={WORKER_IMAGE}",
             "--dataflow_endpoint=http://localhost", "--no_auth",
             f"--sdk_location={folder / 'empty_sdk'}",
             f"--staging_location={folder / 'staging'}",
             f"--template_location={folder / 'job.json'}"])  # fmt: skip
    return json.loads((folder / "job.json").read_text()), folder / "staging"


def _option(job: dict, name: str):
    options = job["environment"]["sdkPipelineOptions"]["options"]
    return options[name]


def test_the_job_runs_inference_on_a_gpu_with_one_sdk_process(job):
    template, staging = job
    graph = beam_runner_api_pb2.Pipeline.FromString((staging / "pipeline.pb").read_bytes())
    inference = [
        transform
        for transform in graph.components.transforms.values()
        if transform.unique_name.endswith("RunInference") and transform.environment_id
    ]
    assert inference
    for step in inference:
        hints = graph.components.environments[step.environment_id].resource_hints
        assert hints["beam:resources:accelerator:v1"] == GPU.encode()
    assert "no_use_multiple_sdk_containers" in template["environment"]["experiments"]
    assert _option(template, "batch_size") == 128
    assert _option(template, "machine_type") == "g2-standard-4"


def test_the_job_uses_the_worker_image_and_stages_this_package_with_its_model(job):
    template, staging = job
    pools = template["environment"]["workerPools"]
    images = {
        image["containerImage"] for pool in pools for image in pool["sdkHarnessContainerImages"]
    }
    assert images == {WORKER_IMAGE}
    with tarfile.open(staging / "workflow.tar.gz") as package:
        names = set(package.getnames())
        installed = package.extractfile("artstyle-0.1.0/artstyle.egg-info/top_level.txt")
        packages = installed.read().decode().split()
    bundle = Path(DEFAULT_BUNDLE).relative_to(REPO)
    for file in ("manifest.json", "head.keras"):
        assert f"artstyle-0.1.0/{bundle}/{file}" in names
    assert sorted(packages) == ["models", "pipeline", "transforms"]  # no bench/: a checkout's


def test_the_worker_image_holds_the_package_and_not_the_benchmarks():
    copied = re.findall(r"^COPY (\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert copied == ["setup.py", "pipeline", "transforms", "models"]
    assert "bench" in (REPO / ".dockerignore").read_text().split()


def test_the_worker_image_pins_what_setup_py_pins():
    dockerfile = (REPO / "Dockerfile").read_text()
    setup = (REPO / "setup.py").read_text()
    beam, tensorflow = (re.search(rf'"{name}==([^"]+)"', setup)[1] for name in PINNED)
    python = re.search(r'python_requires=">=([0-9.]+)"', setup)[1]
    assert f"FROM apache/beam_python{python}_sdk:{beam}\n" in dockerfile
    assert f'"tensorflow[and-cuda]=={tensorflow}"' in dockerfile


PINNED = ("apache-beam", "tensorflow")


def test_a_job_with_embeddings_writes_them_from_its_inference_step(tmp_path, projection_bundle):
    (tmp_path / "empty_sdk").write_bytes(b"")
    (tmp_path / "staging").mkdir()
    with offline():
        run([*DATAFLOW_ARGS, f"--sdk_container_image={WORKER_IMAGE}",
             "--dataflow_endpoint=http://localhost", "--no_auth",
             f"--sdk_location={tmp_path / 'empty_sdk'}",
             f"--staging_location={tmp_path / 'staging'}",
             f"--template_location={tmp_path / 'job.json'}",
             f"--model={projection_bundle}", "--embeddings"])  # fmt: skip
    template = json.loads((tmp_path / "job.json").read_text())
    assert _option(template, "embeddings") is True
    graph = beam_runner_api_pb2.Pipeline.FromString((tmp_path / "staging/pipeline.pb").read_bytes())
    names = [transform.unique_name for transform in graph.components.transforms.values()]
    assert any(name.startswith("WriteEmbeddings/") for name in names)
    assert any(name.endswith("RunInference") for name in names)
