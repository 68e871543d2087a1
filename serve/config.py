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

PRECISIONS = ("auto", "fp32", "bf16")
CLASSIFY_MAX_PIXELS = 12_000_000  # a 12 MP photo (4000x3000); the classifier resizes to its crop anyway  # resolved on each replica by jobs.precision.autocast_dtype


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
    max_pixels: int = option(MAX_PIXELS, "largest image on the style routes (POST /style/jobs, /style, /style/fast), "
                             "width*height, read from its header (422 above)", min=1)
    classify_max_pixels: int = option(CLASSIFY_MAX_PIXELS, "largest image on POST /classify, width*height, read "
                                      "from its header (422 above); the model sees a small crop anyway", min=1)
    request_timeout_s: float = option(300.0, "HTTP proxy timeout for any request (408 past it; python -m serve "
                                      "applies it, a config file sets http_options.request_timeout_s)", above=0)
    unavailable_retry_s: int = option(5, "Retry-After of a 503 when a deployment has no running replica or the "
                                      "job store does not answer", min=1)
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
    style_job_max_s: float = option(600.0, "wall-clock limit of one style job attempt on its replica; past it "
                                    "the job ends failed", above=0)
    job_max_attempts: int = option(2, "attempts per job when its replica dies, then it is marked failed", min=1)
    job_lease_s: float = option(120.0, "a job nobody heartbeats for this long is marked failed", above=0)
    job_ttl_s: float = option(3600.0, "finished jobs (and their PNG) are kept this long", above=0)
    job_store_name: str = option("raycv_style_jobs", "name of the detached job-store actor", metavar="NAME")
    job_store_dir: str = option("", "directory where the job store keeps job records and result PNGs, so a "
                                "restarted store recovers them (default: $TMPDIR/raycv-jobs/<job-store-name>, on "
                                "the node that first creates the store)", metavar="DIR")
    job_store_max_jobs: int = option(1000, "job records kept (finished ones evicted oldest first)", min=1)
    job_store_max_mb: float = option(256.0, "result PNG bytes kept, in MiB (finished jobs evicted oldest first)",
                                     above=0)
    store_timeout_s: float = option(5.0, "longest wait for the job store; past it style routes answer 503", above=0)
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

    @property
    def store_dir(self) -> str:
        """The job store's directory, absolute (job_store_dir, or the default under the temp directory)."""
        import os
        import tempfile

        return os.path.abspath(self.job_store_dir or os.path.join(tempfile.gettempdir(), "raycv-jobs",
                                                                   self.job_store_name))

    def store_args(self) -> dict:
        """get_or_create_store's keyword arguments (the ingress and every style replica pass the same)."""
        return {"name": self.job_store_name, "capacity": self.max_style_jobs, "lease_s": self.job_lease_s,
                "ttl_s": self.job_ttl_s, "max_attempts": self.job_max_attempts, "directory": self.store_dir,
                "max_jobs": self.job_store_max_jobs, "max_bytes": int(self.job_store_max_mb * 2**20)}

    def placement(self) -> list[tuple[str, int, float, float]]:
        """What the application asks Ray to place: (deployment, replicas, CPUs each, GPUs each)."""
        out = [("classifier", self.classifier_replicas, self.classifier_cpus, self.classifier_gpus)]
        if self.style:
            out.append(("style pool", self.style_replicas, self.style_cpus, self.style_gpus))
        if self.fast_styles:
            out.append(("trained styles", self.fast_style_replicas, self.fast_style_cpus, self.fast_style_gpus))
        out.append(("ingress", 1, self.ingress_cpus, 0.0))
        return out


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
    if cfg.request_timeout_s <= cfg.sync_timeout_s:
        raise UserError(f"--request-timeout-s ({cfg.request_timeout_s:g}) must be longer than --sync-timeout-s "
                        f"({cfg.sync_timeout_s:g}), else POST /style is cut off before it can answer")
    return cfg


def check_fits(cfg: ServeConfig, cpus: float, gpus: float) -> None:
    """UserError (one line) when the deployments' replicas need more CPUs or GPUs than `cpus`/`gpus`
    (what the cluster has free): a replica Ray cannot place never starts, and its routes would wait."""
    need_cpu = sum(n * c for _, n, c, _ in cfg.placement())
    need_gpu = sum(n * g for _, n, _, g in cfg.placement())
    parts = ", ".join(f"{what} {n} x {c:g}" for what, n, c, _ in cfg.placement() if n * c)
    if need_cpu > cpus + 1e-9:
        raise UserError(f"the deployments need {need_cpu:g} CPUs ({parts}) but Ray has {cpus:g} free; lower "
                        f"--classifier-cpus, --style-cpus or --fast-style-cpus (fractions such as 0.5 are fine: "
                        f"replicas then share cores), or the replica counts, or give Ray more CPUs (--num-cpus)")
    if need_gpu > gpus + 1e-9:
        gparts = ", ".join(f"{what} {n} x {g:g}" for what, n, _, g in cfg.placement() if n * g)
        raise UserError(f"the deployments need {need_gpu:g} GPUs ({gparts}) but Ray has {gpus:g} free")


def config_from_dict(d: dict[str, Any] | None) -> ServeConfig:
    """ServeConfig from a plain dict (the YAML's `args`), checked; unknown keys refused in one line."""
    return check_serve_config(load_config(ServeConfig, dict(d or {})))
