"""`python -m pipeline.serve [--model BUNDLE] [--host 127.0.0.1] [--port 8000] ...`"""

import logging
import sys

import uvicorn

from models.bundle import ModelBundle
from pipeline.serve.config import parse_config


def serve() -> None:
    """A bad flag or bundle is one line and exit status 2, before anything listens."""
    from pipeline.serve.app import create_app  # FastAPI, and Keras for the model

    config = parse_config()
    bundle = ModelBundle.load(config.model)
    bundle.check_head()  # a head Keras refuses is one line, not a service that never loads
    logging.getLogger("artstyle.serve").setLevel(logging.INFO)
    uvicorn.run(
        create_app(config, bundle),
        host=config.host,
        port=config.port,
        access_log=config.access_log,
        log_level="info",
    )


if __name__ == "__main__":
    parse_config(sys.argv[1:])  # --help and a bad flag answer before Beam and TensorFlow load
    from pipeline.options import run_command

    run_command(serve)
