"""A small client for the inference graph's HTTP API, sync and async, with retries of 503.

    from graph_client import GraphClient
    with GraphClient("http://127.0.0.1:8000") as client:
        answer = client.infer("photo.jpg", classifiers=["age", "gender"])

The bearer token comes from `token`, else from the environment variable `PIPELINE_API_TOKEN`. The command
line tool built on it is `graph-infer` (`graph-infer --help`).
"""

from graph_client.client import AsyncGraphClient, GraphClient, GraphError

__all__ = ["AsyncGraphClient", "GraphClient", "GraphError"]
