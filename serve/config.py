"""The one configuration of the HTTP service (classifier + style pool + ingress).

`python -m serve` builds it from flags, `serve run serve/config.yaml` from the YAML's `args`;
`build_app` (serve/app.py) turns it into a Serve application. It crosses the Ray boundary as
a plain dict (`asdict`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jobs.artifact import PRECISIONS
from jobs.cli import UserError
from jobs.style import StyleConfig


@dataclass
class ServeConfig:
    """Every knob of the service; the defaults suit one CPU machine (GPU: set *_gpus to 1)."""

    classifier: str = ""  # artifact directory (<run>/model) written by jobs.augment / jobs.finetune
    # classifier: dynamic batching and backpressure
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    classifier_replicas: int = 1
    classifier_cpus: float = 1.0
    classifier_gpus: float = 0.0
    classifier_max_ongoing: int = 32  # per replica; raised to max_batch_size if smaller
    classifier_max_queued: int = 64  # per caller; beyond it the answer is 503
    # auto: fp16 autocast on GPU, bf16 autocast + channels_last on a CPU with native bfloat16, else fp32
    classifier_precision: str = "auto"
    # request limits (both routes)
    max_body_mb: float = 16.0
    max_pixels: int = StyleConfig.max_pixels  # decoded image size limit (header check, no decode)
    # style-transfer pool
    style: bool = True
    style_weights: str = "imagenet"  # imagenet | random | PATH (jobs.style.load_vgg)
    style_replicas: int = 1  # fixed count, or the autoscaling minimum when style_max_replicas > it
    style_max_replicas: int = 0  # > style_replicas: autoscale between the two
    style_cpus: float = 1.0
    style_gpus: float = 0.0  # 1 in production: one replica per GPU
    style_device: str = "auto"  # cuda when the replica has a GPU, else cpu
    max_style_jobs: int = 16  # queued + running jobs; beyond it POST answers 503 + Retry-After
    style_max_steps: int = 2000
    style_max_size: int = 1024 * 1024  # H*W of a job's working size
    sync_max_size: int = 128 * 128  # H*W allowed on the synchronous POST /style
    sync_timeout_s: float = 60.0  # POST /style answers 408 past this
    job_max_attempts: int = 2  # a job whose replica dies is retried, then marked failed
    job_lease_s: float = 120.0  # a job nobody heartbeats for this long is marked failed
    job_ttl_s: float = 3600.0  # finished jobs (and their PNG) are kept this long
    job_store_name: str = "raycv_style_jobs"  # the detached job-store actor
    # real-time style transfer: trained style networks (python -m jobs.fast_style --registry DIR)
    fast_styles: str = ""  # the registry directory, <dir>/<style name>/; "" -> not served
    fast_style_replicas: int = 1
    fast_style_cpus: float = 1.0
    fast_style_gpus: float = 0.0
    fast_style_max_side: int = 1024  # larger images are scaled down (aspect kept) before the forward pass
    fast_style_precision: str = "auto"  # auto: bf16 on a CPU with native bfloat16, else fp32; or fp32 | bf16
    ingress_max_ongoing: int = 256
    ingress_cpus: float = 0.0  # it mostly awaits; image checks are short

    def validate(self) -> "ServeConfig":
        """Raise `UserError` for values the service cannot run with; return self."""
        if not self.classifier:
            raise UserError("a classifier artifact directory is required (--classifier DIR)")
        for name in ("max_batch_size", "classifier_replicas", "classifier_max_ongoing", "classifier_max_queued",
                     "max_pixels", "max_style_jobs", "style_max_steps", "style_max_size", "sync_max_size",
                     "job_max_attempts", "ingress_max_ongoing", "fast_style_replicas", "fast_style_max_side"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.style and self.style_replicas < 1:
            raise UserError(f"style_replicas must be >= 1, got {self.style_replicas}")
        for name in ("batch_wait_timeout_s", "classifier_cpus", "classifier_gpus", "style_cpus", "style_gpus",
                     "ingress_cpus", "fast_style_cpus", "fast_style_gpus"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("classifier_precision", "fast_style_precision"):
            if getattr(self, name) not in PRECISIONS:
                raise UserError(f"{name} must be auto, fp32 or bf16, got {getattr(self, name)!r}")
        for name in ("max_body_mb", "sync_timeout_s", "job_lease_s", "job_ttl_s"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


def config_from_dict(d: dict[str, Any] | None) -> ServeConfig:
    """ServeConfig from a plain dict (YAML `args`), refusing unknown keys with one line."""
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"unknown serve option(s): {', '.join(unknown)}")
    try:
        return ServeConfig(**d).validate()
    except TypeError as e:
        raise UserError(f"bad serve options: {e}") from None
