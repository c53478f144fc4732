"""The fidelity table as markdown and as a figure (KL to the full model against K, per strategy)."""

from __future__ import annotations

from pathlib import Path

from crashlm.outputs.plotting import plt, save_figure


def fidelity_markdown(table: dict) -> str:
    """One line per strategy and K: loss, KL and top-1 agreement with the full model."""
    lines = [f"# Emulator fidelity: {table['model']} ({table['num_layers']} layers)", "",
             f"Held-out calibration text; full model loss {table['full_loss']:.3f} nats/token. "
             "Untrained emulators; lower KL and higher agreement are closer to the full model.", "",
             "| strategy | K | loss | KL | top-1 agreement | kept layers |", "|---|---|---|---|---|---|"]
    for row in sorted(table["rows"], key=lambda r: (-r["k"], r["fidelity"]["kl"])):
        f = row["fidelity"]
        lines.append(f"| {row['label']} | {row['k']} | {f['loss']:.3f} | {f['kl']:.3f} | {f['top1']:.3f} | "
                     f"{','.join(map(str, row['kept']))} |")
    return "\n".join(lines) + "\n"


def plot_fidelity(table: dict, path: str | Path) -> Path:
    """KL(full || emulator) and top-1 agreement against K, one line per strategy."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    labels = dict.fromkeys(row["label"] for row in table["rows"])
    for label in labels:
        rows = sorted((r for r in table["rows"] if r["label"] == label), key=lambda r: r["k"])
        ks = [r["k"] for r in rows]
        left.plot(ks, [r["fidelity"]["kl"] for r in rows], marker="o", label=label)
        right.plot(ks, [r["fidelity"]["top1"] for r in rows], marker="o", label=label)
    left.set(xlabel="kept layers K", ylabel="KL(full || emulator), nats", yscale="log",
             title=f"{table['model']}: distance to the full model")
    right.set(xlabel="kept layers K", ylabel="top-1 agreement with the full model", ylim=(0, 1))
    right.legend(fontsize=7)
    return save_figure(fig, path)
