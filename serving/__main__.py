"""`python -m serving` (`make serve`): serve the registry's champion, or one exported folder, over HTTP.

python -m serving                                   # params.yaml's serve: section, the registry
python -m serving --port 9000 --batch-timeout-ms 0  # overrides
python -m serving --model-dir models/savedmodel     # one SavedModel folder as version 1 (no registry)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.config import ServeConfig, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.logs import configure_logging

ENV = "PIPELINE_SERVE_ARGS"  # the settings handed to each uvicorn worker process

log = logging.getLogger("serving")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="its folder is the root")
    parser.add_argument("--host", help="serve.host")
    parser.add_argument("--port", type=int, help="serve.port (0: a free port)")
    parser.add_argument("--workers", type=int, help="serve.workers")
    parser.add_argument("--max-batch-size", type=int, help="serve.max_batch_size")
    parser.add_argument("--batch-timeout-ms", type=float, help="serve.batch_timeout_ms (0: no batching)")
    parser.add_argument("--poll-seconds", type=float, help="serve.poll_seconds")
    parser.add_argument("--log-sample", type=float, help="serve.log_sample (0: no prediction log)")
    parser.add_argument("--shadow-fraction", type=float, help="serve.shadow_fraction")
    parser.add_argument("--batch-images", type=int, help="serve.batch_images (landing batch size)")
    parser.add_argument("--batch-minutes", type=float, help="serve.batch_minutes")
    parser.add_argument("--log-dir", type=Path, help="serve.log_dir (the prediction log and its images)")
    parser.add_argument("--model-dir", type=Path, help="serve this SavedModel folder instead of the registry")
    parser.add_argument("--model-name", help="registered model to serve (default mlflow.registered_model)")
    parser.add_argument("--model-version", default="1", help="the version it serves as (with --model-dir)")
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "host",
        "port",
        "workers",
        "max_batch_size",
        "batch_timeout_ms",
        "poll_seconds",
        "log_sample",
        "shadow_fraction",
        "batch_images",
        "batch_minutes",
        "log_dir",
    )
    found = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if "log_dir" in found:  # a folder given on the command line is relative to where it is run
        found["log_dir"] = str(Path(found["log_dir"]).resolve())
    return found


def app_from_environment() -> Any:
    """The app of one uvicorn worker, from the settings `main` put in the environment."""
    from pipeline.serving.loop import ServingLoop
    from pipeline.serving.service import ModelService
    from pipeline.serving.sources import FolderSource, RegistrySource
    from serving.app import create_app

    configure_logging()
    settings = json.loads(os.environ[ENV])
    params = Path(settings["params"])
    cfg = load_config(params)
    cfg = cfg.model_copy(
        update={"serve": ServeConfig.model_validate({**cfg.serve.model_dump(), **settings["serve"]})}
    )
    name = settings["model_name"] or cfg.mlflow.registered_model
    root = params.resolve().parent
    if settings["model_dir"]:
        source: Any = FolderSource(name, Path(settings["model_dir"]), settings["model_version"])
    else:
        source = RegistrySource(cfg, root, name)
    loop = ServingLoop(cfg, root, name) if cfg.serve.log_sample > 0 else None
    service = ModelService(cfg.serve, cfg.ingest.max_pixels, source, loop=loop)
    return create_app(service, cfg.serve.max_body_mb)


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    configure_logging()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a download is one log line
    args = parse(argv)
    try:
        cfg = load_config(args.params)
        try:
            serve = ServeConfig.model_validate({**cfg.serve.model_dump(), **overrides(args)})
        except ValidationError as error:
            raise ConfigError(
                f"a serve option is out of range: {error.errors()[0]['loc'][0]}: {error.errors()[0]['msg']}"
            ) from None
        if args.model_dir is not None and not args.model_dir.is_dir():
            raise PipelineError(f"--model-dir {args.model_dir} is not a folder; export a model (make run)")
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    port = serve.port or free_port(serve.host)
    os.environ[ENV] = json.dumps(
        {
            "params": str(args.params.resolve()),
            "serve": {**overrides(args), "port": port},
            "model_dir": str(args.model_dir.resolve()) if args.model_dir else None,
            "model_name": args.model_name,
            "model_version": args.model_version,
        }
    )
    log.info("serving on http://%s:%d (page at /, TF Serving REST API under /v1/models/)", serve.host, port)
    uvicorn.run(
        "serving.__main__:app_from_environment",
        factory=True,
        host=serve.host,
        port=port,
        workers=serve.workers,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
