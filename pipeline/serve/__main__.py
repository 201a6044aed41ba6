"""`python -m pipeline.serve [--model BUNDLE] [--host 127.0.0.1] [--port 8000] ...`"""

import logging

import uvicorn

from models.bundle import ModelBundle
from pipeline.options import run_command
from pipeline.serve.app import create_app
from pipeline.serve.config import parse_config


def serve() -> None:
    """A bad flag or bundle is one line and exit status 2, before anything listens."""
    config = parse_config()
    bundle = ModelBundle.load(config.model)
    logging.getLogger("artstyle.serve").setLevel(logging.INFO)
    uvicorn.run(
        create_app(config, bundle),
        host=config.host,
        port=config.port,
        access_log=config.access_log,
        log_level="info",
    )


if __name__ == "__main__":
    run_command(serve)
