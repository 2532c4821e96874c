"""Scale-out on Ray Serve: N replicas of the server's engine behind one HTTP endpoint.

    client → Ray Serve's HTTP proxy → Ingress (server.api.cluster: reads the adapter from the body)
           → EngineReplica, picked by Ray's model multiplexing (model id = adapter@generation)
             → the single server's own FastAPI app, in process, unchanged

Ray is imported only in this package (tests/test_layers.py). `catalog`, `board`, `forwarding` and
`settings` are plain Python, usable and tested without Ray; `keeper`, `residency`, `replica`, `ingress`,
`application` and `run` are the Ray side.
"""
