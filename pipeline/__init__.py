"""Image-classification MLOps pipeline: one module per stage, each with `run(cfg, paths)`."""

__version__ = "0.1.0"
