"""One self-contained HTML page for a run directory.

The report reads what the commands wrote (JSON + PNG) and embeds every figure as a data URI,
so the page can be mailed or archived as one file. It computes nothing: each section shows a
figure with the configuration that produced it, next to it on disk.

Sections, each present only when its files are, the verdict first: the gain recovered per
strategy (``table.json``), emulator fidelity against that gain (``fidelity.png``), each task's
training curves (``<task>/training_curves.png``), the offsite table (``table.json``,
``table.png``), layer similarity and plans (each distinct plan once per folder of plans), and
every other figure under the run directory grouped by folder (lens, divergence, landscape,
...), each with the JSON files of its folder.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from crashlm.core.errors import UsageError
from crashlm.core.io import atomic_path, read_json
from crashlm.emulators.plans import LayerPlan
from crashlm.outputs.tables import table_html

REPORT_FILE = "report.html"
# Figures of an offsite run that lead the report (the pipeline writes them under these names).
FIDELITY_FIGURE, CURVES_FIGURE = "fidelity.png", "training_curves.png"
# Large result JSONs (matrices, grids) are summarised rather than dumped into the page.
_MAX_JSON_CHARS = 4000

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2.5rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5rem; vertical-align: top; }
figure img { max-width: 100%; width: 520px; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.8rem; color: #555; }
details pre { background: #f6f6f6; padding: 0.5rem; font-size: 0.75rem; overflow-x: auto; }
"""


def _figure(path: Path, root: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    caption = html.escape(str(path.relative_to(root)))
    return f'<figure><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


def _json_block(path: Path, root: Path) -> str:
    try:
        text = json.dumps(json.loads(path.read_text(encoding="utf-8")), indent=2)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return ""
    if len(text) > _MAX_JSON_CHARS:
        text = text[:_MAX_JSON_CHARS] + "\n... (truncated; see the file)"
    name = html.escape(str(path.relative_to(root)))
    return f"<details><summary>{name}</summary><pre>{html.escape(text)}</pre></details>"


def _load_plan(path: Path) -> LayerPlan:
    try:
        return LayerPlan.load(path)  # checked: a broken plan is one line, not a traceback
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}") from exc


def _plan_summary(names: list[str], plan: LayerPlan) -> str:
    parts = [f"<b>{html.escape(', '.join(names))}</b>: {plan.strategy} plan, "
             f"{plan.num_layers} layers -> K={plan.k}; trainable {plan.trainable}; kept {plan.kept}"]
    if plan.clusters:
        parts.append("clusters " + " ".join(f"[{c[0]}-{c[-1]}]" if len(c) > 1 else f"[{c[0]}]" for c in plan.clusters))
    return "<p>" + "; ".join(parts) + "</p>"


def _verdict(table: dict) -> str:
    """The gain recovered per strategy, best first: what the run found, before how."""
    rows = sorted((row for row in table["rows"] if "gain_recovered" in row), key=lambda row: -row["gain_recovered"])
    if not rows:
        return ""

    def cells(row: dict) -> list[str]:
        std = row.get("gain_recovered_std")
        return [row["name"].removesuffix(", Plug-in"), f"{100 * row['gain_recovered']:.0f} %",
                "–" if std is None else f"{100 * std:.0f} %", str(row.get("gain_recovered_seeds", 1))]

    lines = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in cells(row)) + "</tr>" for row in rows)
    return ("<h2>Verdict: gain recovered by the plug-in</h2><p>Per seed, (plug-in average - Full ZS average) / "
            "(Full FT average - Full ZS average) over the tasks; the mean and the std over the seeds.</p>"
            "<table><tr><th>strategy</th><th>gain recovered</th><th>std</th><th>seeds</th></tr>"
            f"{lines}</table>")


def _plans(root: Path, used: set[Path]) -> list[str]:
    """Each distinct plan once per folder of plans (strategies sharing one, e.g. crash and crash-share, together)."""
    groups: dict[tuple, list[tuple[Path, LayerPlan]]] = {}
    for path in sorted(root.rglob("plan.json")):
        plan = _load_plan(path)
        key = (path.parent.parent, plan.num_layers, tuple(plan.kept), tuple(plan.trainable), str(plan.clusters))
        groups.setdefault(key, []).append((path, plan))
    body = []
    for group in groups.values():
        (first, plan), folders = group[0], [path.parent for path, _ in group]
        body.append(_plan_summary([str(folder.relative_to(root)) for folder in folders], plan))
        for folder in folders:
            for png in sorted(folder.glob("*.png")):
                if folder == first.parent:
                    body.append(_figure(png, root))
                used.add(png)
        for name in ("plan.json", "similarity.json"):
            if (first.parent / name).exists():
                body.append(_json_block(first.parent / name, root))
    return ["<h2>Layer similarity and plans</h2>", *body] if body else []


def build_report(run_dir: str | Path) -> str:
    """The HTML text of the report for ``run_dir``."""
    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"run directory not found: {root}")
    figures = sorted(root.rglob("*.png"))
    if not figures and not (root / "table.json").exists():
        raise UsageError(f"{root} holds no crashlm results (no table.json and no figures)")
    used: set[Path] = set()
    body = [f"<h1>crashlm report: {html.escape(root.resolve().name)}</h1>"]

    def figures_of(title: str, pngs: list[Path]) -> None:
        pngs = [png for png in pngs if png.exists()]
        if pngs:
            body.append(f"<h2>{title}</h2>" + "".join(_figure(png, root) for png in pngs))
            used.update(pngs)

    if (root / "table.json").exists():
        table = read_json(root / "table.json", "offsite table")
        try:
            verdict, table_text = _verdict(table), table_html(table)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsageError(f"{root / 'table.json'} is not a crashlm offsite table ({exc!r})") from exc
        body.append(verdict)
        figures_of("Emulator fidelity against transfer", [root / FIDELITY_FIGURE])
        figures_of("Training curves", [root / str(task) / CURVES_FIGURE for task in table.get("tasks", [])])
        body.append("<h2>Offsite-tuning table</h2>" + table_text)
        if (root / "table.png").exists():
            body.append(_figure(root / "table.png", root))
            used.add(root / "table.png")
        if (root / "config.json").exists():
            body.append(_json_block(root / "config.json", root))

    body.extend(_plans(root, used))

    by_folder: dict[Path, list[Path]] = {}
    for png in figures:
        if png not in used:
            by_folder.setdefault(png.parent, []).append(png)
    if by_folder:
        body.append("<h2>Analyses</h2>")
        for folder, pngs in sorted(by_folder.items()):
            body.append(f"<h3>{html.escape(str(folder.relative_to(root)) if folder != root else '.')}</h3>")
            body.extend(_figure(png, root) for png in pngs)
            body.extend(_json_block(js, root) for js in sorted(folder.glob("*.json")))

    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>crashlm report: {html.escape(root.resolve().name)}</title><style>{_STYLE}</style></head>"
            f"<body>{''.join(body)}</body></html>")


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` atomically and return its path."""
    text = build_report(run_dir)
    out = Path(run_dir) / REPORT_FILE
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out
