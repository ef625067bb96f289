"""The training run's plot: what a user looks at to see how the epochs went."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_training(history: list[dict[str, Any]], path: Path, best_epoch: int | None = None) -> None:
    """Train loss and validation AUC / GAUC per epoch, side by side; the kept (best) epoch marked."""
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    left.plot(epochs, [h["valid_logloss"] for h in history], marker="o", label="valid log loss")
    left.set_xlabel("epoch"), left.set_ylabel("log loss"), left.legend(), left.grid(alpha=0.3)
    right.plot(epochs, [h["valid_auc"] for h in history], marker="o", label="valid AUC")
    right.plot(epochs, [h["valid_gauc"] for h in history], marker="o", label="valid GAUC")
    if best_epoch is not None:
        for axis in (left, right):
            axis.axvline(best_epoch, color="grey", linestyle="--", linewidth=0.8, label=f"kept: epoch {best_epoch}")
    right.set_xlabel("epoch"), right.set_ylabel("AUC"), right.legend(), right.grid(alpha=0.3)
    fig.suptitle("plexrec training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
