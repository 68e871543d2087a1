"""The servable model artifact: `<run dir>/model/` = weights.pt + artifact.json.

It holds everything needed to classify an image without any training code: architecture name,
class names, the preprocessing preset and the final metrics. Weights load with weights_only=True.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobs.models import build_model
from jobs.presets import Preset

WEIGHTS = "weights.pt"
MANIFEST = "artifact.json"


class ArtifactError(ValueError):
    """The directory is not a loadable artifact (missing files, bad manifest, mismatched weights)."""


def save_artifact(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], arch: str, classes: list[str],
                  preset: Preset, metrics: dict[str, Any] | None = None) -> Path:
    """Write weights and manifest into `path` (created); the manifest is written last, atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, path / WEIGHTS)
    manifest = {"arch": arch, "num_classes": len(classes), "classes": list(classes), "preset": preset.to_dict(),
                "metrics": metrics or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path / MANIFEST)
    return path


def load_artifact(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, list[str], Preset, dict[str, Any]]:
    """Load an artifact: (model in eval mode on `device`, class names, preset, manifest)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        arch, classes, preset = manifest["arch"], list(manifest["classes"]), Preset.from_dict(manifest["preset"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path} is not a model artifact ({MANIFEST}: {e})") from None
    try:
        state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
        model = build_model(arch, len(classes))
        model.load_state_dict(state)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise ArtifactError(f"{path}: cannot load weights: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), classes, preset, manifest

