"""The model side of the service (no web framework here): requests, versions, batching, metrics.

serving/ (the HTTP layer, FastAPI) calls `service.ModelService`; the gate's
serving smoke test (`smoke`) starts that HTTP layer as a child process.
"""
