"""What every training run writes into its model folder besides the card, whatever the engine:
the adapter file name and the loss curve."""

from __future__ import annotations

from pathlib import Path

ADAPTER = "adapter.safetensors"


def loss_curve(history: list[dict[str, float]], path: Path, keys: tuple[str, ...],
               x: str = "step") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stainctl.workspace.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [h[x] for h in history]
    for key in keys:
        if history and key in history[0]:
            ax.plot(steps, [h[key] for h in history], label=key, lw=1, marker=".")
    ax.set_xlabel(x)
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
