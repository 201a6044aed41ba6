"""`python -m pipeline.serve`: the art style of paintings over HTTP, on the pipeline's model.

app.py       routes and their schemas; `create_app`
service.py   the model on the pipeline's engine (loaded once, warmed up), fetching, decoding,
             the answers, Grad-CAM's heatmaps
batcher.py   micro-batching of concurrent requests, and the queue's places
guard.py     which URLs and addresses may be fetched (server-side request forgery)
bodies.py    what /predict accepts, and every body's limits (size, deadline, memory)
errors.py    every error as JSON with a fitting status
metrics.py   Prometheus metrics
config.py    the flags
static/      the page at /
"""
