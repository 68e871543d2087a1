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
from serve.config import ServeConfig

APP_NAME = "raycv"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = ServeConfig()
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classifier", required=True, metavar="DIR",
                   help="model artifact directory (<run>/model, written by jobs.augment or jobs.finetune)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 to accept other machines)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else an embedded Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    p.add_argument("--request-timeout-s", type=float, default=None,
                   help="HTTP proxy timeout for any request (408 past it); default none")
    g = p.add_argument_group("classifier")
    g.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="dynamic batching: most images per forward")
    g.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_timeout_s * 1000,
                   help="dynamic batching: longest wait for a batch to fill")
    g.add_argument("--classifier-replicas", type=int, default=d.classifier_replicas, help="classifier replicas")
    g.add_argument("--classifier-cpus", type=float, default=d.classifier_cpus, help="CPUs per classifier replica")
    g.add_argument("--classifier-gpus", type=float, default=d.classifier_gpus, help="GPUs per classifier replica")
    g.add_argument("--classifier-max-queued", type=int, default=d.classifier_max_queued,
                   help="requests waiting for the classifier beyond which the answer is 503")
    g.add_argument("--classifier-precision", default=d.classifier_precision, choices=["auto", "fp32", "bf16"],
                   help="auto (default): fp16 autocast on GPU, bf16 autocast on a CPU with native bfloat16 "
                        "(AVX-512 BF16/AMX), else fp32; fp32 gives bit-for-bit the training run's evaluation")
    g.add_argument("--max-body-mb", type=float, default=d.max_body_mb, help="largest request body (413 above)")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest image, width*height (422 above)")
    g = p.add_argument_group("style-transfer pool")
    g.add_argument("--no-style", action="store_true", help="serve the classifier only")
    g.add_argument("--style-weights", default=d.style_weights,
                   help="VGG-19 weights: imagenet (torch hub cache), random (offline demo) or a state-dict PATH")
    g.add_argument("--style-replicas", type=int, default=d.style_replicas,
                   help="style replicas (the autoscaling minimum with --style-max-replicas)")
    g.add_argument("--style-max-replicas", type=int, default=d.style_max_replicas,
                   help="autoscale the pool up to this many replicas (0: fixed --style-replicas)")
    g.add_argument("--style-cpus", type=float, default=d.style_cpus, help="CPUs per style replica")
    g.add_argument("--style-gpus", type=float, default=d.style_gpus, help="GPUs per style replica (1 per GPU)")
    g.add_argument("--max-style-jobs", type=int, default=d.max_style_jobs,
                   help="queued + running style jobs beyond which submissions get 503 + Retry-After")
    g.add_argument("--style-max-steps", type=int, default=d.style_max_steps, help="most steps a job may ask for")
    g.add_argument("--sync-timeout-s", type=float, default=d.sync_timeout_s, help="POST /style answers 408 past this")
    g.add_argument("--job-max-attempts", type=int, default=d.job_max_attempts,
                   help="attempts per job when its replica dies")
    g = p.add_argument_group("real-time style transfer")
    g.add_argument("--fast-styles", default=d.fast_styles, metavar="DIR",
                   help="registry of trained style networks (python -m jobs.fast_style --registry DIR); default: off")
    g.add_argument("--fast-style-replicas", type=int, default=d.fast_style_replicas, help="replicas serving them")
    g.add_argument("--fast-style-cpus", type=float, default=d.fast_style_cpus, help="CPUs per replica")
    g.add_argument("--fast-style-gpus", type=float, default=d.fast_style_gpus, help="GPUs per replica")
    g.add_argument("--fast-style-max-side", type=int, default=d.fast_style_max_side,
                   help="larger images are scaled down to this longer side first")
    g.add_argument("--fast-style-precision", default=d.fast_style_precision, choices=["auto", "fp32", "bf16"],
                   help="auto (default): bfloat16 autocast on a CPU with native bf16 (AVX-512 BF16/AMX), else fp32")
    return p.parse_args(argv)


def config_from(args: argparse.Namespace) -> ServeConfig:
    """Flags -> ServeConfig (validated)."""
    return ServeConfig(
        classifier=args.classifier, max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
        classifier_replicas=args.classifier_replicas, classifier_cpus=args.classifier_cpus,
        classifier_gpus=args.classifier_gpus, classifier_max_queued=args.classifier_max_queued,
        classifier_precision=args.classifier_precision,
        max_body_mb=args.max_body_mb, max_pixels=args.max_pixels, style=not args.no_style,
        style_weights=args.style_weights, style_replicas=args.style_replicas,
        style_max_replicas=args.style_max_replicas, style_cpus=args.style_cpus, style_gpus=args.style_gpus,
        max_style_jobs=args.max_style_jobs, style_max_steps=args.style_max_steps,
        sync_timeout_s=args.sync_timeout_s, job_max_attempts=args.job_max_attempts,
        fast_styles=args.fast_styles, fast_style_replicas=args.fast_style_replicas,
        fast_style_cpus=args.fast_style_cpus, fast_style_gpus=args.fast_style_gpus,
        fast_style_max_side=args.fast_style_max_side, fast_style_precision=args.fast_style_precision,
    ).validate()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
        from jobs.style import load_vgg

        load_vgg(cfg.style_weights)  # UserError if the weights are not available here
    print("serve config:", {k: v for k, v in dataclasses.asdict(cfg).items()})
    print(f"classifier: {manifest['arch']} over {len(classes)} classes, preset {preset.to_dict()}")

    from ray import serve

    from serve.app import build_app

    init_ray(args.address, num_cpus=args.num_cpus, include_dashboard=False)
    http = {"host": args.host, "port": args.port}
    if args.request_timeout_s:
        http["request_timeout_s"] = args.request_timeout_s
    serve.start(http_options=http)
    serve.run(build_app(dataclasses.asdict(cfg)), name=APP_NAME, route_prefix="/")
    url = f"http://{args.host}:{args.port}"
    print(f"serving on {url}/  (API docs {url}/docs, health {url}/healthz); Ctrl-C stops", flush=True)
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
