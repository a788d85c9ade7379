"""Plots of a [`ProbeResult`]: a heatmap (languages x layers) and per-layer curves, saved as PNG files."""

import math
import os
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from .probe import ProbeResult


PLOT_INSTALL_HINT = 'Plotting needs matplotlib: `pip install "trl-midalign[plot]"` (or `pip install matplotlib`).'


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, or an `ImportError` that says how to install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(PLOT_INSTALL_HINT) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_probe(result: "ProbeResult", output_dir: str | os.PathLike, prefix: str = "probe") -> list[str]:
    """
    Save a heatmap (languages x layers, retrieval accuracy) and a curve (retrieval accuracy and similarity gap per
    layer, one thin line per language and a thick mean) as PNG files.

    Args:
        result ([`ProbeResult`]):
            The probe to plot.
        output_dir (`str` or `os.PathLike`):
            Directory to write into (created if needed).
        prefix (`str`, *optional*, defaults to `"probe"`):
            File name prefix: the files are `{prefix}_heatmap.png` and `{prefix}_curve.png`.

    Returns:
        `list[str]`: The paths written (heatmap first).
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    name = os.path.basename(os.path.normpath(result.model_name)) if result.model_name else "model"
    title = f"{name}: retrieval accuracy of {result.pooling}-pooled parallel sentences"
    rows = [*result.languages, "mean"]
    matrix = [result.retrieval_accuracy[row] for row in rows]

    width = max(6.0, 0.45 * len(result.layers) + 2.0)
    fig, ax = plt.subplots(figsize=(width, 0.45 * len(rows) + 2.0))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(result.layers)), [str(layer) for layer in result.layers])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_title(title, fontsize=10)
    if len(result.layers) * len(rows) <= 600:
        for r, values in enumerate(matrix):
            for c, value in enumerate(values):
                if not math.isnan(value):
                    color = "black" if value > 0.6 else "white"
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(image, ax=ax, label="retrieval accuracy")
    fig.tight_layout()
    heatmap_path = os.path.join(output_dir, f"{prefix}_heatmap.png")
    fig.savefig(heatmap_path, dpi=120)
    plt.close(fig)

    fig, (acc_ax, gap_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, scores, label in (
        (acc_ax, result.retrieval_accuracy, "retrieval accuracy"),
        (gap_ax, result.similarity_gap, "similarity gap (pairs - non-pairs)"),
    ):
        for language in result.languages:
            if scores.get(language):
                axis.plot(result.layers, scores[language], linewidth=1, alpha=0.6, label=language)
        if scores.get("mean"):
            axis.plot(result.layers, scores["mean"], linewidth=2.5, color="black", label="mean")
        if result.recommended_layer is not None:
            axis.axvline(result.recommended_layer, color="red", linestyle="--", linewidth=1)
        axis.set_xlabel("layer (0 = embeddings)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    acc_ax.set_ylim(0.0, 1.0)
    acc_ax.set_title(f"recommended layer: {result.recommended_layer} (dashed)", fontsize=10)
    acc_ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    curve_path = os.path.join(output_dir, f"{prefix}_curve.png")
    fig.savefig(curve_path, dpi=120)
    plt.close(fig)
    return [heatmap_path, curve_path]
