"""What a finished run leaves in `<storage_path>/<name>/` besides its checkpoints: result.json
(final metrics, config, per-epoch history), curves.png and, for a classifier, the servable artifact
in model/ (`jobs.artifact`, what `python -m serve` loads)."""
from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.paths import is_uri


def write_outputs(out: Path | str, summary: dict[str, Any], state: dict[str, Any]) -> None:
    """Write the run's outputs into `out`; a URI run directory gets them written locally, then uploaded
    next to the checkpoints."""
    if not is_uri(out):
        write_run_files(Path(out), summary, state)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as staging:
        write_run_files(Path(staging), summary, state)
        pyarrow.fs.copy_files(staging, out)


def write_run_files(out: Path, summary: dict[str, Any], state: dict[str, Any]) -> None:
    """result.json, curves.png and, when the checkpoint's meta names an architecture and a preset
    (jobs.augment, jobs.finetune), the servable artifact in out/model/."""
    (out / "result.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    plot_curves(summary["history"], out / "curves.png")
    meta = state["meta"]
    if "arch" in meta and "preset" in meta:
        from jobs.artifact import save_artifact
        from jobs.presets import Preset

        metrics = {k: v for k, v in summary["history"][-1].items() if isinstance(v, (int, float))}
        save_artifact(out / "model", state["model"], meta["arch"], meta["classes"], Preset.from_dict(meta["preset"]), metrics)


@contextmanager
def figure(path: Path | str, size: tuple[float, float] = (6, 4)):
    """`with figure(path) as ax:` draw on `ax`; on exit a grid, the legend, and the PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Train loss and train/test accuracy per epoch, as the reference plots them (train/test loss without accuracy)."""
    epochs = [h["epoch"] for h in history]
    metric = "acc" if "train_acc" in history[0] else "loss"
    tested = [h for h in history if h.get(f"test_{metric}") is not None]  # --eval-every may skip epochs
    with figure(path, (5, 3.5)) as ax:
        ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
        if metric == "acc":
            ax.plot(epochs, [h["train_acc"] for h in history], "--", label="train acc")
        ax.plot([h["epoch"] for h in tested], [h[f"test_{metric}"] for h in tested], "-.", marker=".",
                label=f"test {metric}")
        ax.set_xlabel("epoch")
        ax.set_ylim(bottom=0)
