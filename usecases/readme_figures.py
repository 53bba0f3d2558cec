"""Render the figures of a use case's README from its model card, so no figure is typed by hand.

Each ``usecases/<case>/README.md`` holds hand-written prose and one generated block between the
markers below. ``build_models.py`` refreshes the block whenever it writes a card; to refresh all
of them from the committed cards: ``python -m usecases.readme_figures``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from usecases import CASES, model_card

BEGIN = "<!-- figures:begin - generated from models/model_card.json by usecases/readme_figures.py -->"
END = "<!-- figures:end -->"

_ROOT = Path(__file__).resolve().parent


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def _signature(entries: list[dict[str, Any]]) -> str:
    parts = []
    for e in entries:
        q = e["quantization"]
        quant = f", scale {q['scale']:.6g}, zero point {q['zero_point']}" if q else ""
        parts.append(f"`{e['name']}` (tensor `{e['tensor']}`) {e['dtype']} {e['shape']}{quant}")
    return "; ".join(parts)


def _files_table(variants: dict[str, Any], with_accuracy: bool) -> list[str]:
    head = "| variant | file | bytes | sha256 |" + (" held-out accuracy |" if with_accuracy else "")
    rule = "|---|---|---:|---|" + ("---:|" if with_accuracy else "")
    rows = [head, rule]
    for variant, v in variants.items():
        row = f"| {variant} | `{v['file']}` | {v['size_bytes']:,} | `{v['sha256'][:16]}…` |"
        rows.append(row + (f" {_pct(v['accuracy'])} |" if with_accuracy else ""))
    return rows


def _io_lines(variants: dict[str, Any]) -> list[str]:
    lines = []
    for variant, v in variants.items():
        lines.append(f"- {variant} inputs: {_signature(v['inputs'])}")
        lines.append(f"- {variant} outputs: {_signature(v['outputs'])}")
        lines.append(f"- {variant} ops: {', '.join(v['ops'])}")
    return lines


def _classifier(card: dict[str, Any]) -> list[str]:
    variants = card["variants"]
    lines = [*_files_table(variants, with_accuracy=True), ""]
    for variant, v in variants.items():
        if "presence_accuracy" in v:
            lines.append(f"- {variant} presence accuracy (empty vs occupied): {_pct(v['presence_accuracy'])}")
    lines += _io_lines(variants)
    lines.append(f"- MACs per inference: {card['macs_per_inference']:,}; parameters: {card['parameters']:,}")
    split = card["data"]["splits"]["held_out"]
    lines.append(f"- held-out split: {split['per_class']} per class, generator seed {split['seed']}")
    classes = card["classes"]
    lines += ["", "int8 confusion matrix on the held-out split (rows: true class, columns: predicted):", ""]
    lines.append("| true \\ predicted | " + " | ".join(classes) + " |")
    lines.append("|---|" + "---:|" * len(classes))
    for name, row in zip(classes, variants["int8"]["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(n) for n in row) + " |")
    return lines


def _multi_exit(card: dict[str, Any]) -> list[str]:
    lines = ["Stages:", "", "| stage | MACs | parameters | float32 file (bytes) | int8 file (bytes) |"]
    lines.append("|---:|---:|---:|---|---|")
    for s in card["stages"]:
        f32, int8 = s["variants"]["float32"], s["variants"]["int8"]
        lines.append(
            f"| {s['stage']} | {s['macs']:,} | {s['parameters']:,} | `{f32['file']}` ({f32['size_bytes']:,}) "
            f"| `{int8['file']}` ({int8['size_bytes']:,}) |"
        )
    lines += ["", "Exits (accuracy of each exit on the whole held-out split):", ""]
    lines.append("| exit | threshold | float32 accuracy | int8 accuracy | cumulative MACs |")
    lines.append("|---:|---:|---:|---:|---:|")
    for e in card["exits"]:
        threshold = "-" if e["threshold"] is None else f"{e['threshold']:.2f}"
        lines.append(
            f"| {e['exit']} | {threshold} | {_pct(e['accuracy']['float32'])} | {_pct(e['accuracy']['int8'])} "
            f"| {e['cumulative_macs']:,} |"
        )
    lines += ["", "Early-exit policy on the clean held-out split:", ""]
    lines.append("| variant | accuracy | exit 1 / 2 / 3 | mean MACs |")
    lines.append("|---|---:|---|---:|")
    for variant, m in card["multi_exit"].items():
        dist = " / ".join(_pct(p) for p in m["exit_distribution"])
        lines.append(f"| {variant} | {_pct(m['accuracy'])} | {dist} | {m['mean_macs']:,.0f} |")
    lines += ["", "By image difficulty (int8):", ""]
    lines.append("| difficulty | accuracy | exit 1 / 2 / 3 | mean MACs |")
    lines.append("|---|---:|---|---:|")
    for band in card["multi_exit_by_difficulty"]["int8"]:
        lo, hi = band["difficulty"]
        dist = " / ".join(_pct(p) for p in band["exit_distribution"])
        lines.append(f"| {lo:.2f}-{hi:.2f} | {_pct(band['accuracy'])} | {dist} | {band['mean_macs']:,.0f} |")
    slow = card["slowdown"]
    lines += [
        "",
        f"Slowdown inputs ({slow['samples']} images, L-inf epsilon {slow['epsilon']}, "
        f"{slow['steps']} steps):",
        "",
        "| variant | inputs | accuracy | exit 1 / 2 / 3 | mean MACs |",
        "|---|---|---:|---|---:|",
    ]
    for variant in ("float32", "int8"):
        for kind in ("clean", "perturbed"):
            m = slow[variant][kind]
            dist = " / ".join(_pct(p) for p in m["exit_distribution"])
            lines.append(f"| {variant} | {kind} | {_pct(m['accuracy'])} | {dist} | {m['mean_macs']:,.0f} |")
    lines += [""]
    for s in card["stages"]:
        lines += [f"Stage {s['stage']}:", *_io_lines(s["variants"]), ""]
    return lines[:-1]


def render(card: dict[str, Any]) -> str:
    body = _multi_exit(card) if "stages" in card else _classifier(card)
    return "\n".join([BEGIN, "", *body, "", END])


def update_readme(case: str) -> None:
    """Replace the generated block of ``usecases/<case>/README.md`` with figures from the card."""
    path = _ROOT / case / "README.md"
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{path.name} of {case} has no generated-figures block")
    path.write_text(pattern.sub(lambda _: render(model_card(case)), text))


if __name__ == "__main__":
    for case in CASES:
        if (_ROOT / case / "models" / "model_card.json").exists():
            update_readme(case)
