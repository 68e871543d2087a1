"""FastStylePool: trained feed-forward style networks (jobs.fast_style), one forward pass per request.

Several styles share one deployment through Serve model multiplexing: the ingress tags each
call with `multiplexed_model_id=<style name>`, Serve routes it to a replica that already holds
that style when there is one, and `get_model` loads a missing style from the registry directory
(`<registry>/<name>/`, written by `python -m jobs.fast_style --registry`), keeping the most
recently used few per replica. The registry is read on every listing, so a newly trained style
is served without a restart (a style retrained under an existing name reaches a replica that
already holds it only after that replica evicts it or restarts).
"""
from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from ray import serve

from jobs import fastconv
from jobs.images import load_image
from jobs.precision import autocast_dtype, dtype_name
from jobs.transformer_net import (MANIFEST, MIN_SIDE, STYLE_THUMBNAIL, StyleModelError, list_style_models,
                                  load_style_model, stylize_image, valid_style_name)
from serve.errors import ApiError, quiet_client_errors

log = logging.getLogger("ray.serve")
MODELS_PER_REPLICA = 8  # a TransformerNet is 6.7 MB of weights: a few styles fit any replica


@serve.deployment(max_ongoing_requests=4, health_check_period_s=10)
class FastStylePool:
    """Serves every style of one registry directory; a bad request raises ApiError (404, 422)."""

    def __init__(self, registry: str, threads: int = 1, use_gpu: bool = False, max_side: int = 1024,
                 max_pixels: int = 40_000_000, precision: str = "auto"):
        torch.set_num_threads(max(1, threads))
        self.registry = os.path.abspath(registry)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        dtype = autocast_dtype(precision, self.device, "stylize")
        self.precision = dtype_name(dtype)
        # load_style_model converts every CPU model; its fp32 forwards run through NNPACK
        self.convolutions = "winograd" if fastconv.applies(self.device, dtype) else "default"
        log.info("fast style: %s forwards on %s, %s convolutions", self.precision, self.device, self.convolutions)
        self.max_side, self.max_pixels = max_side, max_pixels
        # forwards run off the event loop (health checks stay answered), one at a time: concurrent
        # forwards on the same cores only slow each other down
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fast-style")
        quiet_client_errors()
        self.warmup_ms = self._warm_up()  # before the constructor returns: Serve routes here only once warm

    def _warm_up(self) -> float | None:
        """One forward of the registry's first style on a small image (None: no style trained yet)."""
        names = sorted(list_style_models(self.registry))
        if not names:
            return None
        t0 = time.perf_counter()
        try:
            model, _ = load_style_model(os.path.join(self.registry, names[0]), self.device)
            stylize_image(model, Image.new("RGB", (64, 64)), self.device, self.precision)
        except StyleModelError as e:  # that style answers 500 when asked for; the others still serve
            log.warning("fast style: warm-up with %s failed: %s", names[0], e)
            return None
        ms = (time.perf_counter() - t0) * 1000
        log.info("fast style: warmed up with %s in %.0f ms", names[0], ms)
        return ms

    def ready(self) -> dict:
        return {"warmup_ms": None if self.warmup_ms is None else round(self.warmup_ms, 1)}

    def styles(self) -> list[dict]:
        """The registry's styles: name, style image, training size, epochs, VGG weights, created."""
        keys = ("style_image", "image_size", "epochs", "weights", "created")
        return [{"name": name, **{k: m.get(k) for k in keys}, "thumbnail": f"/styles/{name}/image"}
                for name, m in list_style_models(self.registry).items()]

    def thumbnail(self, name: str) -> bytes | None:
        """The style image thumbnail (JPEG) of a style, or None."""
        path = os.path.join(self.registry, name, STYLE_THUMBNAIL)
        if not valid_style_name(name) or not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return f.read()

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def get_model(self, name: str) -> torch.nn.Module:
        """Load style `name` from the registry (Serve caches it per replica, least recently used out)."""
        model, _ = await asyncio.to_thread(load_style_model, os.path.join(self.registry, name), self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        log.info("fast style: loaded %s", name)
        return model

    async def stylize(self, data: bytes) -> dict:
        """Image bytes, style = the request's multiplexed model id -> {"png", "ms", "size"}."""
        name = serve.get_multiplexed_model_id()
        if not valid_style_name(name) or not os.path.isfile(os.path.join(self.registry, name, MANIFEST)):
            raise ApiError(404, f"unknown style {name!r}; GET /styles lists the served ones")
        img = await asyncio.to_thread(self._decode, data)  # off the event loop, beside a running forward
        try:
            model = await self.get_model(name)
        except StyleModelError as e:
            raise ApiError(500, f"style {name!r} cannot be loaded: {e}") from None
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._forward, model, img)

    def _decode(self, data: bytes):
        """Bytes -> PIL RGB image, its longer side at most max_side (aspect kept); 422 if unusable."""
        img = load_image(data, self.max_pixels, "image")
        w, h = img.size
        if max(img.size) > self.max_side:  # the activations grow with the pixels
            img.thumbnail((self.max_side, self.max_side))
        if min(img.size) < MIN_SIDE:  # after the resize: a thin image gets thinner
            scaled = f" (scaled to {img.size[0]}x{img.size[1]} for the longer side of {self.max_side})" \
                if img.size != (w, h) else ""
            raise ApiError(422, f"image is {w}x{h}{scaled}; both sides must be >= {MIN_SIDE} pixels")
        return img

    def _forward(self, model: torch.nn.Module, img) -> dict:
        t0 = time.perf_counter()
        out = stylize_image(model, img, self.device, self.precision)
        ms = (time.perf_counter() - t0) * 1000
        buf = io.BytesIO()
        out.save(buf, format="PNG")
        return {"png": buf.getvalue(), "ms": ms, "size": list(out.size)}

    def check_health(self) -> None:
        """Unhealthy when the forward thread died (Serve replaces the replica); a missing registry only means 404s."""
        if self.executor._shutdown:
            raise RuntimeError("fast style replica: the forward thread is gone")
