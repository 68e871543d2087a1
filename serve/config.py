"""The one configuration of the HTTP service (classifier + style pool + ingress).

Each field is declared once, with `jobs.config.option`: from it come its `python -m serve` flag
(serve/__main__.py), the checks of types, choices and ranges, and what `serve run
serve/config.yaml` accepts in `args` (`config_from_dict`). `build_app` (serve/app.py) turns it into a
Serve application; it crosses the Ray boundary as a plain dict (`asdict`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.cli import UserError
from jobs.config import load_config, option
from jobs.images import MAX_PIXELS
from serve.origin import parse_allowed

PRECISIONS = ("auto", "fp32", "bf16")  # resolved on each replica by jobs.precision.autocast_dtype


@dataclass
class ServeConfig:
    """Every knob of the service; the defaults suit one CPU machine (GPU: set *_gpus to 1)."""

    classifier: str = option("", "model artifact directory (<run>/model, written by jobs.augment or jobs.finetune); "
                             "required", metavar="DIR")
    # classifier: dynamic batching and backpressure
    max_batch_size: int = option(16, "dynamic batching: most images per forward", min=1)
    batch_wait_timeout_s: float = option(0.01, "dynamic batching: longest wait for a batch to fill, in seconds "
                                         "(or --batch-wait-ms)", min=0)
    classifier_replicas: int = option(1, "classifier replicas", min=1)
    classifier_cpus: float = option(1.0, "CPUs (and torch threads) per classifier replica", min=0)
    classifier_gpus: float = option(0.0, "GPUs per classifier replica", min=0)
    classifier_max_ongoing: int = option(32, "requests a classifier replica takes at once (raised to "
                                         "--max-batch-size if smaller)", min=1)
    classifier_max_queued: int = option(64, "requests waiting for the classifier beyond which the answer is 503",
                                        min=1)
    classifier_precision: str = option("auto", "auto: fp16 autocast on GPU, bf16 autocast on a CPU with native "
                                       "bfloat16 (AVX-512 BF16/AMX), else fp32; fp32 gives bit-for-bit the training "
                                       "run's evaluation", choices=PRECISIONS)
    # request limits (every route)
    max_body_mb: float = option(16.0, "largest request body in MiB (413 above, refused before it is read)", above=0)
    max_pixels: int = option(MAX_PIXELS, "largest image, width*height, read from its header (422 above)", min=1)
    allow_origin: str = option("", "origins (comma-separated, e.g. http://localhost:3000) whose web pages may POST "
                               "or DELETE here; a write from another origin is refused 403 (the service's own page "
                               "and requests without an Origin header always pass)", metavar="ORIGIN[,ORIGIN]")
    # style-transfer pool
    style: bool = option(True, "serve the style-transfer pool (--no-style: the classifier only)")
    style_weights: str = option("imagenet", "VGG-19 weights: imagenet (torch hub cache), random (offline demo) or a "
                                "state-dict PATH", metavar="WEIGHTS")
    style_replicas: int = option(1, "style replicas (the autoscaling minimum with --style-max-replicas)", min=0)
    style_max_replicas: int = option(0, "autoscale the pool up to this many replicas (0: fixed --style-replicas)",
                                     min=0)
    style_cpus: float = option(1.0, "CPUs per style replica", min=0)
    style_gpus: float = option(0.0, "GPUs per style replica (1 in production: one replica per GPU)", min=0)
    style_device: str = option("auto", "device of the style replicas: auto (cuda when the replica has a GPU, else "
                               "cpu), cpu, cuda or cuda:N", metavar="DEVICE")
    max_style_jobs: int = option(16, "queued + running style jobs beyond which submissions get 503 + Retry-After",
                                 min=1)
    style_max_steps: int = option(2000, "most steps a job may ask for", min=1)
    style_max_work: int = option(50_000, "most steps x scales x distinct VGG layers a job may ask for (the work "
                                 "bound of one job)", min=1)
    style_max_lbfgs_mb: float = option(2048.0, "most memory in MiB a job's L-BFGS history may take (2 x "
                                       "lbfgs_history x 3 x H x W float32)", above=0)
    style_max_size: int = option(1024 * 1024, "largest H*W of a job's working size", min=1)
    sync_max_size: int = option(128 * 128, "largest H*W on the synchronous POST /style", min=1)
    sync_timeout_s: float = option(60.0, "POST /style answers 408 (and cancels the job) past this", above=0)
    style_max_queued: int = option(32, "job requests waiting in the style pool's router beyond which a job fails "
                                   "at once (\"style pool is full\") instead of waiting", min=1)
    job_max_attempts: int = option(2, "attempts per job when its replica dies, then it is marked failed", min=1)
    job_lease_s: float = option(120.0, "a job nobody heartbeats for this long is marked failed", above=0)
    job_ttl_s: float = option(3600.0, "finished jobs (and their PNG) are kept this long", above=0)
    job_store_name: str = option("raycv_style_jobs", "name of the detached job-store actor", metavar="NAME")
    # real-time style transfer: trained style networks (python -m jobs.fast_style --registry DIR)
    fast_styles: str = option("", "registry of trained style networks (python -m jobs.fast_style --registry DIR); "
                              "default: off", metavar="DIR")
    fast_style_replicas: int = option(1, "replicas serving the trained styles", min=1)
    fast_style_cpus: float = option(1.0, "CPUs per trained-style replica", min=0)
    fast_style_gpus: float = option(0.0, "GPUs per trained-style replica", min=0)
    fast_style_max_ongoing: int = option(4, "requests a trained-style replica takes at once", min=1)
    fast_style_max_queued: int = option(32, "requests waiting for the trained styles beyond which the answer is 503",
                                        min=1)
    fast_style_max_side: int = option(1024, "larger images are scaled down to this longer side first", min=1)
    fast_style_precision: str = option("auto", "auto: bfloat16 autocast on a CPU with native bf16 (AVX-512 BF16/AMX), "
                                       "else fp32", choices=PRECISIONS)
    # the ingress: it mostly awaits; image checks are short
    ingress_max_ongoing: int = option(256, "requests the ingress takes at once", min=1)
    ingress_cpus: float = option(0.0, "CPUs reserved for the ingress", min=0)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def check_serve_config(cfg: ServeConfig) -> ServeConfig:
    """The checks that relate fields (each field's own are in its declaration); return cfg."""
    if not cfg.classifier:
        raise UserError("a classifier artifact directory is required (--classifier DIR)")
    try:
        parse_allowed(cfg.allow_origin)
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.style and cfg.style_replicas < 1:
        raise UserError(f"--style-replicas must be at least 1 with the style pool on, got {cfg.style_replicas}")
    return cfg


def config_from_dict(d: dict[str, Any] | None) -> ServeConfig:
    """ServeConfig from a plain dict (the YAML's `args`), checked; unknown keys refused in one line."""
    return check_serve_config(load_config(ServeConfig, dict(d or {})))
