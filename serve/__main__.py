"""`python -m serve --classifier ARTIFACT_DIR`: the classifier and the style pool over HTTP.

Starts an embedded local Ray (or joins --address / RAY_ADDRESS), deploys serve.app:build_app
and serves until Ctrl-C. The same application runs from serve/config.yaml with `serve run`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import time

from jobs.cli import UserError, init_ray, run_cli
from jobs.config import build_parser, load_config
from serve.config import ServeConfig, check_fits, check_serve_config

APP_NAME = "raycv"


def build_cli() -> argparse.ArgumentParser:
    """One flag per ServeConfig field, `--config FILE.json`, `--address`, and the flags of this process."""
    p = build_parser(ServeConfig, "python -m serve", __doc__)
    p.usage = "python -m serve --classifier DIR [options]  (--help lists them)"
    p.error = _one_line  # a bad flag or value: one line and exit 2, like every other mistake
    g = p.add_argument_group("this process (command line only)")
    g.add_argument("--host", default="127.0.0.1", help="HTTP bind address, 0.0.0.0 to accept other machines (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    g.add_argument("--num-cpus", type=int, default=None, metavar="N", help="CPUs of the embedded Ray (default: all)")
    g.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="port of the embedded Ray's Prometheus metrics endpoint (http://127.0.0.1:PORT/metrics; "
                        "default: a free port Ray picks; a cluster's own is set by `ray start --metrics-export-port`)")
    g.add_argument("--batch-wait-ms", type=float, default=None, metavar="MS",
                   help="--batch-wait-timeout-s in milliseconds (the older flag)")
    return p


def _one_line(message: str):
    raise UserError(message)


def config_from(args: argparse.Namespace) -> ServeConfig:
    """Flags (over --config FILE.json, over the defaults) -> ServeConfig, checked."""
    if args.batch_wait_ms is not None:
        if args.batch_wait_timeout_s is not None:
            raise UserError("give --batch-wait-ms or --batch-wait-timeout-s, not both")
        args.batch_wait_timeout_s = args.batch_wait_ms / 1000
    return check_serve_config(load_config(ServeConfig, args, args.config))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_cli().parse_args(argv)
    cfg = config_from(args)
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    # fail here, in one line, rather than in a replica's constructor
    from jobs.artifact import ArtifactError, load_artifact

    try:
        _, classes, preset, manifest = load_artifact(cfg.classifier)
    except ArtifactError as e:
        raise UserError(str(e)) from None
    if cfg.fast_styles and not os.path.isdir(cfg.fast_styles):
        raise UserError(f"--fast-styles {cfg.fast_styles} is not a directory (train one: python -m jobs.fast_style --registry DIR)")
    if cfg.style:
        from jobs.vgg import load_vgg

        load_vgg(cfg.style_weights)  # UserError if the weights are not available here
    print("serve config:", {k: v for k, v in dataclasses.asdict(cfg).items()})
    print(f"classifier: {manifest['arch']} over {len(classes)} classes, preset {preset.to_dict()}")

    from ray import serve

    from serve.app import build_app

    import ray

    embedded = not (args.address or os.environ.get("RAY_ADDRESS"))
    if embedded and args.num_cpus is not None:
        check_fits(cfg, args.num_cpus, float("inf"))  # the embedded Ray's CPUs are known: refuse before starting it
    extra = {}
    if args.metrics_port is not None and embedded:
        extra["_metrics_export_port"] = args.metrics_port
    init_ray(args.address, num_cpus=args.num_cpus, include_dashboard=False, **extra)
    # a replica Ray cannot place never starts and its routes would wait: refuse here, in one line
    free = ray.available_resources()
    try:
        check_fits(cfg, free.get("CPU", 0.0), free.get("GPU", 0.0))
    except UserError:
        ray.shutdown()
        raise
    serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_app(dataclasses.asdict(cfg)), name=APP_NAME, route_prefix="/")
    url = f"http://{args.host}:{args.port}"
    print(f"serving on {url}/  (API docs {url}/docs, health {url}/healthz, ready {url}/readyz); Ctrl-C stops",
          flush=True)
    node = ray._private.worker._global_node
    if node is not None and getattr(node, "metrics_export_port", None):
        print(f"Prometheus metrics: http://127.0.0.1:{node.metrics_export_port}/metrics", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    finally:
        print("shutting down", flush=True)
        serve.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    run_cli(main)
