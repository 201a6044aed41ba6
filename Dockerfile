# The worker image for Dataflow GPU jobs: Beam's Python 3.11 SDK image at the version
# setup.py pins, TensorFlow with its CUDA libraries at the version setup.py pins, and this
# package (which brings the rest of its pins and the shipped model bundle).
#
# Build and push (a Docker engine and an Artifact Registry repository are needed):
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/artstyle-worker:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/artstyle-worker:0.1.0
# then run the pipeline with --sdk_container_image=<that tag> (and no --setup_file).
# tests/test_dataflow.py checks that these pins equal setup.py's.
FROM apache/beam_python3.11_sdk:2.77.0

COPY setup.py /opt/artstyle/
COPY pipeline /opt/artstyle/pipeline
COPY transforms /opt/artstyle/transforms
COPY models /opt/artstyle/models
RUN pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0" /opt/artstyle

# Beam's SDK harness is the image's entry point, as in the base image.
ENTRYPOINT ["/opt/apache/beam/boot"]
