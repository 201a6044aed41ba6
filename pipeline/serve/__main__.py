"""`python -m pipeline.serve [--model BUNDLE] [--index INDEX] [--host 127.0.0.1] [--port 8000] ...`

Nothing here or in what it imports loads Beam, nor, on OpenVINO, TensorFlow: the service
is ready seconds sooner (docs/service.md).
"""

import logging
import socket

import uvicorn

from models.bundle import BundleError, ModelBundle
from models.engine_choice import choose_engine
from models.openvino_engine import converted_file
from models.vector_index import VectorIndex, VectorIndexError
from pipeline.exits import run_reporting
from pipeline.flags import UsageError
from pipeline.serve.config import ServeConfig, parse_config
from pipeline.similar import open_index


def main() -> None:
    """A bad flag, an address in use, a bad bundle or index is one line and exit status 2;
    Ctrl-C one line and 130."""
    run_reporting(serve, lambda: (UsageError, BundleError, VectorIndexError))


def serve() -> None:
    """A bad flag, an address that cannot be listened on, a bad bundle, or an --index that
    is missing, corrupt, empty or of another model is one line and exit status 2, before
    the model loads and before anything listens."""
    config = parse_config()
    with bind(config) as address:
        bundle = ModelBundle.load(config.model)
        index = opened_index(config, bundle)
        check_head(bundle, config.engine, embeddings=index is not None)
        from pipeline.serve.app import create_app  # FastAPI, and what runs the model

        logging.getLogger("artstyle.serve").setLevel(logging.INFO)
        app = create_app(config, bundle, index=index)
        server = uvicorn.Server(uvicorn.Config(app, access_log=config.access_log, log_level="info"))
        # uvicorn says where it listens only when it binds the socket itself.
        logging.getLogger("uvicorn.error").info("Uvicorn running on %s", url_of(address))
        server.run(sockets=[address])


def opened_index(config: ServeConfig, bundle: ModelBundle) -> VectorIndex | None:
    """--index, read whole and checked against the bundle, which must give embeddings."""
    return open_index(config.index, bundle) if config.index is not None else None


def check_head(bundle: ModelBundle, engine: str, embeddings: bool) -> None:
    """A head Keras refuses is one line, not a service that never loads. (OpenVINO, running
    files it converted before, needs no check: Keras read the head then. The classifier it
    runs is the one with embeddings where the service has an index.)"""
    on_keras = choose_engine(engine, on_this_machine=True).engine == "keras"
    if on_keras or not converted_file(bundle, None, embeddings).is_file():
        bundle.check_head()


def bind(config: ServeConfig) -> socket.socket:
    """The service's socket, bound to --host and --port first of all: an address in use, or
    one this machine does not have, is told at once, not once the model has loaded. Made as
    a TCP socket by name (IPPROTO_TCP), as uvicorn's own are: asyncio turns Nagle's
    algorithm off only on connections of such a socket, and with it on, every request after
    the first on a kept-alive connection waited for the client's delayed acknowledgement."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    address = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    address.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own
    try:
        address.bind((config.host, config.port))
    except OSError as error:
        address.close()
        reason = (error.strerror or str(error)).lower()
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {reason}") from None
    return address


def url_of(address: socket.socket) -> str:
    host, port = address.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


if __name__ == "__main__":
    main()
