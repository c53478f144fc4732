"""Figures for crashlm's analyses, saved atomically (temp name + rename) with the Agg backend."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from crashlm.core.io import atomic_path  # noqa: E402


def save_figure(fig: matplotlib.figure.Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save ``fig`` to ``path`` (format from its suffix, default png) atomically, then close it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".") or "png"
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Layer similarity (CKA)


def layer_labels(num_layers: int) -> list[str]:
    """Axis labels of an (L + 1)-state layer axis: "emb" then layers 1..L."""
    return ["emb", *(str(i) for i in range(1, num_layers + 1))]


def _as_cka_matrix(result_or_matrix) -> np.ndarray:
    if hasattr(result_or_matrix, "cka"):
        return np.asarray(result_or_matrix.cka, dtype=np.float64)
    if hasattr(result_or_matrix, "detach"):  # a torch tensor
        result_or_matrix = result_or_matrix.detach().cpu().numpy()
    return np.asarray(result_or_matrix, dtype=np.float64)


def _draw_cka(ax: matplotlib.axes.Axes, matrix: np.ndarray, title: str) -> matplotlib.image.AxesImage:
    """One CKA heatmap on ``ax`` (fixed 0..1 colour scale, so panels compare), layer 0 at top left."""
    labels = layer_labels(matrix.shape[0] - 1)
    image = ax.imshow(matrix, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    stride = max(1, math.ceil(len(labels) / 16))
    ticks = list(range(0, len(labels), stride))
    ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90)
    ax.set_yticks(ticks, [labels[t] for t in ticks])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title)
    return image


def _result_title(result) -> str:
    return f"{Path(result.model).name} on {result.task}\nlinear CKA ({result.estimator}, {result.pooling} pooling)"


def plot_cka_heatmap(result_or_matrix, path: str | Path, title: str | None = None) -> Path:
    """(L + 1) x (L + 1) CKA heatmap of a :class:`~crashlm.analysis.similarity.SimilarityResult` or a matrix."""
    matrix = _as_cka_matrix(result_or_matrix)
    if title is None:
        title = _result_title(result_or_matrix) if hasattr(result_or_matrix, "model") else "linear CKA"
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = _draw_cka(ax, matrix, title)
    fig.colorbar(image, ax=ax, label="CKA")
    return save_figure(fig, path)


def plot_adjacent_cka(result, path: str | Path) -> Path:
    """CKA between each state and the next (emb-1, 1-2, ...): dips are natural cluster boundaries."""
    labels = layer_labels(result.num_layers)
    pairs = [f"{labels[i]}-{labels[i + 1]}" for i in range(result.num_layers)]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.22 * len(pairs)), 3.6))
    ax.plot(range(len(pairs)), result.adjacent, marker="o", markersize=3)
    stride = max(1, math.ceil(len(pairs) / 32))
    ax.set_xticks(range(0, len(pairs), stride), pairs[::stride], rotation=90)
    ax.set_xlabel("adjacent layers")
    ax.set_ylabel("CKA")
    ax.set_ylim(min(0.0, min(result.adjacent)), 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{Path(result.model).name} on {result.task}: adjacent-layer CKA")
    return save_figure(fig, path)


def plot_cka_grid(results: list, path: str | Path) -> Path:
    """CKA heatmaps of several models side by side on one colour scale (modular structure vs size)."""
    if not results:
        raise ValueError("plot_cka_grid needs at least one result")
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results) + 0.8, 4.4), squeeze=False)
    for ax, result in zip(axes[0], results):
        image = _draw_cka(ax, _as_cka_matrix(result), f"{Path(result.model).name} ({result.num_layers} layers)")
    fig.colorbar(image, ax=list(axes[0]), label="CKA", shrink=0.9)
    first = results[0]
    fig.suptitle(f"linear CKA between layers on {first.task} ({first.estimator}, {first.pooling})")
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Layer plans


def plot_clusters(plan, path: str | Path, matrix=None, title: str | None = None) -> Path:
    """A plan over the layer-similarity heatmap: cluster boxes, kept layers marked.

    ``matrix`` is the (L + 1) x (L + 1) similarity (embeddings first) when the plan came from
    one; without it only the layer strip is drawn. Trainable kept layers are marked with a
    filled circle, frozen kept layers with a hollow one.
    """
    L = plan.num_layers
    if matrix is not None:
        fig, (ax, strip) = plt.subplots(
            2, 1, figsize=(6.4, 7.0), gridspec_kw={"height_ratios": [6, 1]}, constrained_layout=True
        )
        image = _draw_cka(ax, _as_cka_matrix(matrix), title or f"{plan.strategy} plan, K={plan.k}")
        fig.colorbar(image, ax=ax, label="similarity")
        for cluster in plan.clusters or []:
            # Layer l sits at index l + 1 (index 0 is the embedding output).
            lo, size = cluster[0] + 1, len(cluster)
            ax.add_patch(Rectangle((lo - 0.5, lo - 0.5), size, size, fill=False, edgecolor="cyan", linewidth=1.5))
    else:
        fig, strip = plt.subplots(figsize=(6.4, 1.8), constrained_layout=True)
        strip.set_title(title or f"{plan.strategy} plan, K={plan.k}")
    for index, cluster in enumerate(plan.clusters or [[layer] for layer in range(L)]):
        strip.axvspan(cluster[0] - 0.5, cluster[-1] + 0.5, color="0.85" if index % 2 else "0.7", linewidth=0)
    trainable = set(plan.trainable)
    strip.scatter(plan.trainable, [0] * len(plan.trainable), s=60, color="crimson", label="trainable (adapter)", zorder=3)
    frozen = [layer for layer in plan.kept if layer not in trainable]
    strip.scatter(frozen, [0] * len(frozen), s=60, facecolors="none", edgecolors="navy", label="frozen (emulator)", zorder=3)
    strip.set_xlim(-0.5, L - 0.5)
    strip.set_yticks([])
    strip.set_xlabel("layer (0-based); shaded bands are clusters")
    strip.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=2, frameon=False)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Offsite-tuning table


def plot_offsite_table(table: dict, path: str | Path) -> Path:
    """Grouped bars: one group per task (plus the average), one bar per table row."""
    tasks = list(table["tasks"])
    rows = table["rows"]
    groups = tasks + ["average"]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(groups) + 0.25 * len(rows)), 4.4))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, max(2, len(rows))))
    for i, row in enumerate(rows):
        values = [row["scores"].get(t, np.nan) for t in tasks] + [row["average"] if row["average"] is not None else np.nan]
        errors = [row.get("spread", {}).get(t, 0.0) for t in tasks] + [0.0]
        x = np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(x, 100 * np.asarray(values, dtype=float), width, yerr=100 * np.asarray(errors), label=row["name"],
               color=colours[i], capsize=2)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"Offsite-tuning on {Path(str(table['model'])).name}")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_fidelity_gain(points: list[tuple[str, float, float, float | None]], path: str | Path, title: str) -> Path:
    """Whether fidelity predicts transfer: each ``(label, KL, gain recovered, its std)`` as a point with error bar."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, kl, gain, std in points:
        ax.errorbar([kl], [100 * gain], yerr=None if std is None else [100 * std], fmt="o", capsize=3)
        ax.annotate(label, (kl, 100 * gain), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for level in (0, 100):  # Full ZS and Full FT
        ax.axhline(level, color="0.6", linewidth=0.8, linestyle="--")
    ax.set_xlabel("emulator KL to the full model on held-out calibration text (nats/token)")
    ax.set_ylabel("gain recovered by the plug-in (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return save_figure(fig, path)


def plot_training_curves(panels: dict[str, list[tuple[str, list, list]]], path: str | Path, title: str) -> Path:
    """Validation loss against optimizer step: one panel per loss (its name the y label), one line per run."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False, constrained_layout=True)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for label, steps, losses in lines:
            ax.plot(steps, losses, marker="o", markersize=3, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Layer lenses and layer-to-layer divergence


def _depth_labels(depth: list[int]) -> list[str]:
    """State labels by full-model depth ("emb", then the layer each state stands for): for a full
    model the same as :func:`layer_labels`, for an emulator the layers its positions came from."""
    return ["emb", *(str(d) for d in depth[1:])]


def _token_text(token: str, width: int = 8) -> str:
    """A token as printable cell text: escapes for newlines, tabs and other control characters
    (which fonts cannot draw), long tokens cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in token)
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_trajectory(trajectory, path: str | Path, title: str | None = None) -> Path:
    """The lens figure: states (bottom: embeddings) x prompt positions, coloured by the top-1
    probability, each cell showing the top-1 next token of that state at that position."""
    probs = np.asarray(trajectory.top_probs, dtype=np.float64)
    states, positions = probs.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.95 * positions, 1.4 + 0.26 * states))
    image = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0, origin="lower", aspect="auto", interpolation="nearest")
    fontsize = 7 if states <= 40 else 5
    for s in range(states):
        for t in range(positions):
            colour = "black" if probs[s, t] > 0.6 else "white"
            ax.text(t, s, _token_text(trajectory.top_tokens[s][t]), ha="center", va="center", fontsize=fontsize, color=colour)
    ax.set_xticks(range(positions), [_token_text(tok, 12) for tok in trajectory.input_tokens], rotation=45, ha="right")
    labels = _depth_labels(trajectory.depth)
    stride = max(1, math.ceil(states / 32))
    ax.set_yticks(range(0, states, stride), labels[::stride])
    ax.set_xlabel("input token (each cell: predicted next token)")
    ax.set_ylabel("layer (of the full model)")
    ax.set_title(title or f"{Path(trajectory.model).name}: {trajectory.lens} lens")
    fig.colorbar(image, ax=ax, label="top-1 probability", fraction=0.04)
    with warnings.catch_warnings():  # tokens in scripts the font lacks (CJK...) are drawn as boxes
        warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
        return save_figure(fig, path)


def plot_lens_curves(stats: list, path: str | Path, title: str | None = None) -> Path:
    """KL to the final distribution, top-1 agreement and perplexity per layer, one line per model.

    The x axis is each state's depth in the full model (``LensStats.depth``), so an emulator's
    few positions sit at the layers they were taken from.
    """
    panels = (
        ("kl_to_final", "KL(final || layer) [nats]", "linear"),
        ("top1_agreement", "top-1 agreement with final", "linear"),
        ("perplexity", "perplexity (next token)", "log"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(13.5, 3.8), constrained_layout=True)
    for ax, (key, label, scale) in zip(axes, panels):
        for item in stats:
            ax.plot(item.depth, getattr(item, key), marker="o", markersize=3, label=item.model)
        ax.set_yscale(scale)
        ax.set_xlabel("depth in the full model (0 = embeddings)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"{stats[0].lens} lens per layer")
    return save_figure(fig, path)


_MEASURE_TITLES = {
    "js": "Jensen-Shannon [nats]",
    "kl": "KL(row || column) [nats]",
    "hellinger": "Hellinger",
    "l2": "L2",
    "cosine": "cosine distance",
}


def plot_divergence(result, measure: str, path: str | Path) -> Path:
    """Heatmap of one divergence measure between every pair of states (embeddings first)."""
    labels = _depth_labels(result.depth)
    stride = max(1, math.ceil(len(labels) / 16))
    ticks = list(range(0, len(labels), stride))
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    image = ax.imshow(np.asarray(result.measures[measure], dtype=np.float64), cmap="magma_r", interpolation="nearest")
    ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90)
    ax.set_yticks(ticks, [labels[t] for t in ticks])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(f"{Path(result.model).name} on {result.task}: {_MEASURE_TITLES.get(measure, measure)}\n"
                 f"{result.lens} lens, {result.tokens} tokens")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Loss landscapes


def _landscape_title(result) -> str:
    return f"{result.config.task} validation loss ({result.examples} examples)"


def plot_landscape_1d(result, path: str | Path) -> Path:
    """Loss along the line from model a (alpha 0) to model b (alpha 1), end points named."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(result.alphas, result.losses, marker="o", markersize=3)
    for anchor in result.anchors:
        ax.annotate(anchor.label, (anchor.coords[0], anchor.loss), textcoords="offset points", xytext=(0, 8),
                    ha="left" if anchor.coords[0] == 0 else "right", fontsize=8)
    ax.set_xlabel(r"$\alpha$:  $\theta = \theta_a + \alpha\,(\theta_b - \theta_a)$")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.set_title(f"{_landscape_title(result)}; barrier {result.barrier:.3g}")
    return save_figure(fig, path)


def _landscape_grid(result) -> tuple[np.ndarray, np.ndarray, np.ma.MaskedArray]:
    xs, ys = np.meshgrid(np.asarray(result.xs), np.asarray(result.ys))
    return xs, ys, np.ma.masked_invalid(np.asarray(result.losses, dtype=np.float64))


def _axis_labels(result) -> tuple[str, str]:
    if result.config.directions == "models":
        return f"towards {result.anchor('x').label}", f"towards {result.anchor('y').label}"
    return "random direction 1 (filter-normalised)", "random direction 2 (filter-normalised)"


def plot_landscape_2d_contour(result, path: str | Path, levels: int = 20) -> Path:
    """Filled contours of the 2D landscape, with the anchor models marked and named."""
    xs, ys, losses = _landscape_grid(result)
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    filled = ax.contourf(xs, ys, losses, levels=levels, cmap="viridis")
    lines = ax.contour(xs, ys, losses, levels=levels, colors="white", linewidths=0.4, alpha=0.6)
    ax.clabel(lines, lines.levels[::4], fontsize=6, fmt="%.2f")
    fig.colorbar(filled, ax=ax, label="loss")
    for anchor in result.anchors:
        ax.plot(*anchor.coords, marker="*", markersize=12, color="red", markeredgecolor="black")
        ax.annotate(anchor.label, anchor.coords, textcoords="offset points", xytext=(6, 6), fontsize=8, color="white")
    xlabel, ylabel = _axis_labels(result)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{result.anchor('origin').label}: {_landscape_title(result)}", fontsize=9)
    return save_figure(fig, path)


def plot_landscape_2d_surface(result, path: str | Path) -> Path:
    """3D surface of the 2D landscape, with the anchor models marked at their losses."""
    xs, ys, losses = _landscape_grid(result)
    fig = plt.figure(figsize=(7.0, 5.6))
    ax = fig.add_subplot(projection="3d", computed_zorder=False)  # else the surface may hide the anchors
    ax.plot_surface(xs, ys, losses.filled(np.nan), cmap="viridis", alpha=0.85, linewidth=0, antialiased=True)
    for anchor in result.anchors:
        ax.scatter(*anchor.coords, anchor.loss, color="red", edgecolor="black", s=50, depthshade=False, zorder=10)
        ax.text(*anchor.coords, anchor.loss, f" {anchor.label}", fontsize=8, zorder=11)
    xlabel, ylabel = _axis_labels(result)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_zlabel("loss")
    ax.set_title(f"{result.anchor('origin').label}: {_landscape_title(result)}", fontsize=9)
    return save_figure(fig, path)
