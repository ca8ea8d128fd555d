"""Evaluation reports: JSON for machines, a Markdown summary and PNG plots for people, TensorBoard series.

A report is a dict with run-level keys (``command``, ``config``, ``seed``, ``base_model``,
``dataset``, ``split``, ``definitions``) and ``entries``: one dict per (editor, mode, edits per
step). When a run has a single entry its keys are also copied to the top level, so
``report["edit_success"]`` works for a plain ``--mode single`` run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from datamodules.atomic import atomic_path, write_text

# (column title, entry key, format) of the summary table
COLUMNS: list[tuple[str, str, str]] = [
    ("editor", "label", "{}"), ("mode", "mode", "{}"), ("K", "edits_per_step", "{}"), ("edits", "n_edits", "{}"),
    ("ES (EM)", "edit_success", "{:.3f}"), ("ES (tok)", "edit_success_token_acc", "{:.3f}"),
    ("GS (EM)", "generality", "{:.3f}"), ("GS (tok)", "generality_token_acc", "{:.3f}"),
    ("loc agree", "locality_agreement", "{:.3f}"), ("loc KL", "locality_kl", "{:.4f}"), ("drawdown", "drawdown", "{:+.4f}"), ("± se", "drawdown_stderr", "{:.4f}"),
    ("R->W", "flips_right_to_wrong", "{}"), ("W->R", "flips_wrong_to_right", "{}"),
    ("loc = base", "locality_base_agreement", "{:.3f}"),
    ("ER end", "edit_retention", "{:.3f}"), ("TestR end", "test_retention", "{:.3f}"),
    ("TestR (base) end", "test_retention_base", "{:.3f}"), ("rolled back", "n_edits_rolled_back", "{}"),
    ("s/edit", "seconds_per_edit", "{:.4f}"), ("changed", "params_changed", "{:,.0f}"),
]


def jsonable(x: Any) -> Any:
    """Plain JSON values: NaN/inf become null (JSON has no NaN), paths and tensors become str/float."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return jsonable(x.item())
    return str(x)


def _cell(entry: dict, key: str, fmt: str) -> str:
    v = entry.get(key)
    return "-" if v is None else fmt.format(v)


# which answers each locality figure compares with: a real pretrained LM rarely gives the gold answer of a
# locality question, so its gold-based figures are near 0 by construction and the base-answer ones are used
LOCALITY_FIGURES = ("Locality figures: drawdown, R->W / W->R and TestR compare with the gold answers (exact match "
                    "on labelled inputs); loc = base and TestR (base) compare with the unedited model's own greedy "
                    "answers (exact match), the figures to read for a pretrained model whose gold accuracy is near 0; "
                    "loc agree is top-1 agreement at answer positions.")


def table(entries: Sequence[dict]) -> str:
    """The comparison table of all entries, as Markdown (also readable as plain text)."""
    lines = ["| " + " | ".join(c for c, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(e, k, f) for _, k, f in COLUMNS) + " |" for e in entries]
    return "\n".join(lines)


def entry_label(entry: dict) -> str:
    """What tells an entry's editor apart in a report (two checkpoints or budgets of one editor share its name)."""
    return entry.get("label") or entry["editor"]


def _by_mode(entries: Sequence[dict], mode: str) -> list[dict]:
    return [e for e in entries if e.get("mode") == mode]


def _clean(xs: Sequence[Any]) -> list[float]:
    return [math.nan if x is None else x for x in xs]


def plot_retention(entries: Sequence[dict], path: Path) -> bool:
    """SR, GR, ER, TrainR and TestR over the stream, one panel per editor. False if no sequential entry."""
    seq = _by_mode(entries, "sequential")
    if not seq:
        return False
    fig, axes = plt.subplots(1, len(seq), figsize=(5 * len(seq), 4), squeeze=False, sharey=True)
    for ax, e in zip(axes[0], seq):
        for key, label, style in (("sr", "SR", "o-"), ("gr", "GR", "s-"), ("er", "ER", "^-"),
                                  ("train_r", "TrainR", "x--"), ("test_r", "TestR", "d--")):
            ax.plot(e["checkpoints"], _clean(e[key]), style, label=label)
        ax.set_xscale("log")
        ax.set_title(f"{entry_label(e)}: retention over the stream")
        ax.set_xlabel("edits applied")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share right / retention ratio")
    axes[0][-1].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def plot_locality_drift(entries: Sequence[dict], path: Path) -> bool:
    """Locality agreement, KL and drawdown versus the number of edits (stream and batch size)."""
    seq, bat = _by_mode(entries, "sequential"), _by_mode(entries, "batch")
    if not seq and not bat:
        return False
    fig, axes = plt.subplots(2, 3, figsize=(14, 7), squeeze=False)
    for row, (group, xkey, xlabel) in enumerate(((seq, "checkpoints", "edits applied one after another"),
                                                 (bat, "edits_per_step", "edits applied at once (K)"))):
        for col, (key, title) in enumerate((("locality_agreement", "top-1 agreement with original"),
                                            ("locality_kl", "KL(original || edited)"),
                                            ("drawdown", "accuracy drawdown"))):
            ax = axes[row][col]
            for editor in sorted({entry_label(e) for e in group}):
                pts = [e for e in group if entry_label(e) == editor]
                if xkey == "checkpoints":
                    xs, ys = pts[0]["checkpoints"], pts[0][f"{key}_curve"]
                else:
                    pts.sort(key=lambda e: e["edits_per_step"])
                    xs, ys = [e["edits_per_step"] for e in pts], [e[key] for e in pts]
                ax.plot(xs, _clean(ys), "o-", label=editor)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            if group and col == 0:
                ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def plot_batch(entries: Sequence[dict], path: Path) -> bool:
    """Edit success and generality versus edits per step, one line per editor."""
    bat = _by_mode(entries, "batch")
    if not bat:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for editor in sorted({entry_label(e) for e in bat}):
        pts = sorted((e for e in bat if entry_label(e) == editor), key=lambda e: e["edits_per_step"])
        ks = [e["edits_per_step"] for e in pts]
        line = ax.plot(ks, _clean([e["edit_success"] for e in pts]), "o-", label=f"{editor} edit success")[0]
        ax.plot(ks, _clean([e["generality"] for e in pts]), "s--", color=line.get_color(), label=f"{editor} generality")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("edits applied at once (K)")
    ax.set_ylabel("exact match")
    ax.set_title("edit success vs edits per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def plot_budget(entries: Sequence[dict], path: Path) -> bool:
    """Single-edit figures versus the budget of weights an edit may change (``eval.py --editor
    surgery_grad@10 surgery_grad@100``), one line per method. False unless a method ran at two budgets."""
    single = [e for e in _by_mode(entries, "single") if (e.get("editor_config") or {}).get("n_params")]
    methods = sorted({e["editor"] for e in single})
    if not any(len({e["editor_config"]["n_params"] for e in single if e["editor"] == m}) > 1 for m in methods):
        return False
    panels = (("edit_success", "edit success (EM)"), ("generality", "generality (EM)"),
              ("drawdown", "accuracy drawdown"), ("flips_right_to_wrong", "locality answers right -> wrong"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for m in methods:
            pts = sorted((e["editor_config"]["n_params"], e.get(key)) for e in single if e["editor"] == m)
            ax.plot([n for n, _ in pts], _clean([v for _, v in pts]), "o-", label=m)
        ax.set_xscale("log")
        ax.set_xlabel("weights an edit may change (n)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def write_tensorboard(entries: Sequence[dict], log_dir: Path, summary: str) -> None:
    """The plotted series as scalars (step = edits applied, or K for batch) plus the table as text."""
    from torch.utils.tensorboard import SummaryWriter

    for old in log_dir.glob("events.out.tfevents.*"):  # a rerun replaces this report's series, not adds to them
        old.unlink()
    with SummaryWriter(str(log_dir)) as w:
        for e in entries:
            tag = f"{entry_label(e)}/{e['mode']}"
            if e["mode"] == "sequential":
                for key in ("sr", "gr", "er", "train_r", "test_r", "locality_agreement_curve",
                            "locality_kl_curve", "drawdown_curve"):
                    for x, y in zip(e["checkpoints"], e[key]):
                        if y is not None:
                            w.add_scalar(f"{tag}/{key.removesuffix('_curve')}", y, x)
            else:
                step = e["edits_per_step"]
                for key in ("edit_success", "generality", "locality_agreement", "locality_kl", "drawdown"):
                    if e.get(key) is not None:
                        w.add_scalar(f"{tag}/{key}", e[key], step)
        w.add_text("summary", summary)


def markdown(report: dict, plots: Sequence[Path]) -> str:
    """The human summary: what was run, the comparison table, the stream curves, plots, definitions."""
    entries = report["entries"]
    out = [f"# Editor evaluation: {report['dataset']} ({report['split']} split) on `{report['base_model']}`", "",
           f"Command: `{report['command']}`", "",
           f"Seed {report['seed']}; {report['n_edits_available']} held-out edits available. "
           "Every number compares the edited model with an untouched copy of the original; "
           "definitions are at the end.", "", "## Summary", "", LOCALITY_FIGURES, "", table(entries), ""]
    configs = {entry_label(e): e.get("editor_config") or {} for e in entries}
    out += ["## Editors", ""] + [f"- **{name}**: " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k != "layers")
                                 + f" ({len(cfg.get('layers', []))} edited matrices)" for name, cfg in configs.items()]
    notes = [f"- {entry_label(e)} {e['mode']} K={e['edits_per_step']}: {e['n_edits']} edits used"
             + (f", {e['n_edits_left_out']} left out (not a whole step/fold)" if e.get("n_edits_left_out") else "")
             + (f"; {e['note']}" if e.get("note") else "")
             for e in entries if e.get("n_edits_left_out") or e.get("note")]
    if notes:
        out += ["", "## Notes", ""] + notes
    for e in _by_mode(entries, "sequential"):
        out += ["", f"## Sequential stream: {entry_label(e)} ({e['folds']} fold(s), {e['edits_per_step']} edit(s) per step, "
                f"{e['n_edits_applied']} applied)", "",
                "| edits applied | SR | GR | ER | TrainR | TestR | loc agree | loc KL | drawdown |", "|" + "---|" * 9]
        for p, x in enumerate(e["checkpoints"]):
            vals = [e[k][p] for k in ("sr", "gr", "er", "train_r", "test_r")]
            vals += [e[f"{k}_curve"][p] for k in ("locality_agreement", "locality_kl", "drawdown")]
            out.append(f"| {x} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |")
    if plots:
        out += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    out += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    return "\n".join(out) + "\n"


def write_report(report: dict, path: str | Path) -> dict[str, Path]:
    """Write ``path`` (JSON) and beside it ``<stem>.md``, ``<stem>_*.png`` and ``tensorboard/<stem>``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = jsonable(report)
    entries = report["entries"]
    if len(entries) == 1:
        report = {**entries[0], **report}
    written = {"json": path}  # written last: a report JSON on disk means everything beside it is complete
    plots = []
    for name, fn in (("retention", plot_retention), ("locality_drift", plot_locality_drift), ("batch", plot_batch),
                     ("budget", plot_budget)):
        png = path.with_name(f"{path.stem}_{name}.png")
        if fn(entries, png):
            plots.append(png)
            written[name] = png
    md = path.with_suffix(".md")
    write_text(md, markdown(report, plots))
    written["markdown"] = md
    tb = path.parent / "tensorboard" / path.stem
    write_tensorboard(entries, tb, table(entries))
    written["tensorboard"] = tb
    write_text(path, json.dumps(report, indent=1))
    return written


# run-level keys that must agree for entries of several reports to be compared in one; then eval.py's
# settings that choose the edits and the locality inputs scored, and the data's fingerprint where both have one
SAME_PROTOCOL = ("base_model", "dataset", "data_file", "split", "seed", "n_edits_available")
SAME_SETTINGS = ("n_edits", "loc_per_edit", "n_test_probe")


def merge_reports(paths: Sequence[str | Path], out: str | Path) -> dict[str, Path]:
    """Write one report (table, plots, TensorBoard) with the entries of several runs of ``eval.py`` on
    the same held-out edits, e.g. budgets run one command at a time; refuses reports that differ in
    base model, data (its fingerprint where both have one), split, seed, edits or locality settings."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    for p, r in zip(paths[1:], reports[1:]):
        diff = [k for k in SAME_PROTOCOL if r.get(k) != first.get(k)]
        diff += [k for k in SAME_SETTINGS if (r.get("eval_args") or {}).get(k) != (first.get("eval_args") or {}).get(k)]
        if "data_fingerprint" in r and "data_fingerprint" in first:
            diff += ["data_fingerprint"] if r["data_fingerprint"] != first["data_fingerprint"] else []
        if diff:
            raise ValueError(f"{p} differs from {paths[0]} in {', '.join(diff)}: its figures are not comparable")
    merged = {k: first.get(k) for k in (*SAME_PROTOCOL, "family", "definitions")}
    merged["eval_args"] = {k: (first.get("eval_args") or {}).get(k) for k in SAME_SETTINGS}
    if all("data_fingerprint" in r for r in reports):
        merged["data_fingerprint"] = first["data_fingerprint"]
    merged["command"] = " ; ".join(r["command"] for r in reports)
    merged["merged_from"] = [str(p) for p in paths]
    # budgeted editors are told apart by their budget: the same method may come from several runs
    merged["entries"] = []
    for e in (e for r in reports for e in r["entries"]):
        n = (e.get("editor_config") or {}).get("n_params")
        e = {**e, "label": f"{e['editor']}@{n}" if n and entry_label(e) == e["editor"] else entry_label(e)}
        if any((m["label"], m["mode"], m.get("edits_per_step")) == (e["label"], e["mode"], e.get("edits_per_step"))
               for m in merged["entries"]):
            raise ValueError(f"two entries labelled {e['label']!r} ({e['mode']}, K={e.get('edits_per_step')}) in "
                             f"{', '.join(map(str, paths))}: rerun one with its own label (eval.py --editors "
                             f"'[{{class_path: ..., label: NAME}}]')")
        merged["entries"].append(e)
    return write_report(merged, out)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lightning_modules.report",
                                 description="merge eval.py reports made on the same held-out edits into one")
    ap.add_argument("out", help="the merged report's JSON path (.md, plots and TensorBoard beside it)")
    ap.add_argument("reports", nargs="+", help="report JSON files written by eval.py")
    args = ap.parse_args()
    print(merge_reports(args.reports, args.out)["json"])
