"""ClassifierDeployment: the fine-tuned classifier behind dynamic batching.

One request = one image's bytes. The replica decodes it with the safe loader of jobs/images.py
and applies the artifact's own eval transform (`Preset.eval_transform`, the test-time transform of
training) in a worker thread, so the event loop stays free to form batches; `@serve.batch` stacks
concurrent requests into one forward pass. Each answer names the model version it came from (the
first 12 hex digits of the artifact's content hash), so a client sees a hot swap. A new artifact is swapped in through `user_config`
(`reconfigure`), without restarting the replica. A bad image raises `ImageInputError`, which the
ingress answers with a 422.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import Callable, NamedTuple

import torch
from ray import serve

from jobs.artifact import ArtifactError, load_artifact
from jobs.images import load_image
from jobs.precision import autocast_dtype, dtype_name
from serve.config import CLASSIFY_MAX_PIXELS
from serve.errors import quiet_client_errors
from serve.metrics import metric

log = logging.getLogger("ray.serve")


class Served(NamedTuple):
    """What one artifact serves with, swapped as a whole: a batch never mixes two models."""

    model: torch.nn.Module
    classes: list[str]
    transform: Callable  # PIL image -> (3, crop, crop), the artifact's eval transform
    autocast: torch.dtype | None  # None: fp32
    info: dict  # what /healthz shows
    path: str  # the artifact directory (absolute): never shown, only compared on reconfigure


def content_hash(directory: str) -> str:
    """The first 16 hex digits of the SHA-256 over an artifact's files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, directory).encode() + b"\0")
            with open(full, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


@serve.deployment(max_ongoing_requests=32, health_check_period_s=10)
class ClassifierDeployment:
    """Serves one artifact; `user_config` = {"artifact", "max_batch_size", "batch_wait_timeout_s",
    "max_pixels", "precision"}.

    Keys missing from `user_config` take the values in `defaults` (the application's own), so a
    config override may name just the new artifact.
    """

    def __init__(self, threads: int = 1, use_gpu: bool = False, defaults: dict | None = None):
        # one replica per CPU share: more torch threads than cores only adds contention
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.defaults = {"max_batch_size": 16, "batch_wait_timeout_s": 0.01, "max_pixels": CLASSIFY_MAX_PIXELS,
                         "precision": "auto", **(defaults or {})}
        self.state: Served | None = None
        self.max_pixels = self.defaults["max_pixels"]
        self.batching: dict = {}
        self.failures = 0  # consecutive forward failures not caused by the input
        quiet_client_errors()

    def reconfigure(self, user_config: dict) -> None:
        """Load the artifact named in `user_config` and swap it in; batching knobs apply at once.

        Loading happens before the swap, so requests keep using the old model until the new one
        is ready; a bad artifact raises and Serve keeps the replica on its previous config.
        """
        user_config = {**self.defaults, **user_config}
        if not user_config.get("artifact"):
            raise ValueError("user_config needs 'artifact': the model artifact directory")
        path = os.path.abspath(user_config["artifact"])
        try:
            autocast = autocast_dtype(user_config["precision"], self.device, "classify")
        except ValueError as e:
            raise ValueError(f"user_config: {e}") from None
        if self.state is None or self.state.path != path or self.state.autocast != autocast:
            try:
                model, classes, preset, manifest = load_artifact(path, self.device)
            except ArtifactError as e:
                raise ValueError(str(e)) from None
            # channels_last everywhere: fastest in reduced precision and on GPUs, and in fp32 on a 2-core
            # AVX2 CPU a batch of 16 ran 1.17x faster than NCHW, a single image as fast (BENCHMARKS.md)
            model = model.to(memory_format=torch.channels_last)
            transform = preset.eval_transform()
            # warm up before the swap: the first request on a new model does not pay for it, and a
            # replica becomes RUNNING (what /readyz waits for) only after one inference
            warmup_ms = self._warm_up(model, transform, autocast)
            digest = content_hash(path)
            # no absolute path in an answer: the directory's name, and a hash of its content
            info = {"artifact": os.path.basename(path), "artifact_sha256": digest, "model_version": digest[:12],
                    "arch": manifest["arch"], "classes": classes, "preset": preset.to_dict(),
                    "metrics": manifest.get("metrics", {}), "created": manifest.get("created"),
                    "precision": dtype_name(autocast), "warmup_ms": round(warmup_ms, 1)}
            self.state = Served(model, classes, transform, autocast, info, path)
            log.info("classifier: serving %s (%s, %d classes, version %s)", path, manifest["arch"], len(classes),
                     digest[:12])
        self.max_pixels = int(user_config["max_pixels"])
        self.batching = {"max_batch_size": int(user_config["max_batch_size"]),
                         "batch_wait_timeout_s": float(user_config["batch_wait_timeout_s"])}
        self.predict.set_max_batch_size(self.batching["max_batch_size"])
        self.predict.set_batch_wait_timeout_s(self.batching["batch_wait_timeout_s"])

    def _warm_up(self, model: torch.nn.Module, transform: Callable, autocast: torch.dtype | None) -> float:
        """One forward of a blank image through the eval transform and the model; its time in ms."""
        from PIL import Image

        t0 = time.perf_counter()
        x = transform(Image.new("RGB", (64, 64)))[None].to(self.device)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
            model(x.contiguous(memory_format=torch.channels_last))
        return (time.perf_counter() - t0) * 1000

    async def classify(self, data: bytes) -> dict:
        """Image bytes -> {"label", "score", "probabilities", "model_version"}; an unusable image raises
        ImageInputError (422; 415 for a format not accepted)."""
        transform, max_pixels = self.state.transform, self.max_pixels
        x = await asyncio.to_thread(lambda: transform(load_image(data, max_pixels, "image")))  # (3, crop, crop)
        return await self.predict(x)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict(self, xs: list[torch.Tensor]) -> list[dict]:
        """Batched forward: N tensors (3, crop, crop) -> N answers, softmax over the artifact's classes."""
        model, classes, _, dtype, info, _ = self.state  # one snapshot per batch: its model and version agree
        version = info["model_version"]
        try:
            metric("batch_size").observe(len(xs))
        except Exception:  # noqa: BLE001 - metrics never fail a request
            pass
        x = torch.stack(xs).to(self.device)  # (N, 3, crop, crop)
        try:
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                x = x.contiguous(memory_format=torch.channels_last)
                probs = torch.softmax(model(x).float(), dim=1).cpu()  # (N, num_classes)
        except RuntimeError:
            self.failures += 1
            raise
        self.failures = 0
        out = []
        for p in probs:
            i = int(p.argmax())
            out.append({"label": classes[i], "score": float(p[i]),
                        "probabilities": {c: float(v) for c, v in zip(classes, p)}, "model_version": version})
        return out

    def info(self) -> dict:
        """What is being served: artifact name and content hash, architecture, classes, preset, metrics, batching."""
        return {**self.state.info, **self.batching, "max_pixels": self.max_pixels, "device": str(self.device)}

    def check_health(self) -> None:
        """Unhealthy (Serve replaces the replica) without a model or after repeated forward failures."""
        if self.state is None:
            raise RuntimeError("no model loaded")
        if self.failures >= 3:
            raise RuntimeError(f"{self.failures} forward passes failed in a row")
