"""The plots of a table under <out>/<table>/ (matplotlib, Agg): per-case Dice of every row over all seeds, the
training curves of each row from its runs' tensorboard events, and for table5 Dice against the dropout-rate gap."""
import csv
import math
import statistics
from pathlib import Path

def per_case_dice(run, list_name) -> list:
    """Per-case Dice (%) of a run's final evaluation (ACDC: the mean over the classes of each volume)."""
    path = run.run_dir / f"eval_{Path(list_name).stem}" / "metrics.csv"
    if not run.summary(list_name) or not path.is_file():
        return []
    cases = {}
    with open(path) as f:
        for r in csv.DictReader(f):
            cases.setdefault(r["case"], []).append(float(r["dice"]) * 100)
    return [statistics.mean(v) for v in cases.values()]


def training_curves(run_dir: Path) -> dict:
    """Every ``train/*`` scalar of a run's tensorboard events: ``{tag: (steps, values)}``; a step logged twice
    (a resumed run repeats the iterations after its last checkpoint) keeps the later value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    curves = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith("train/"):
                curves.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: tuple(zip(*sorted(points.items()))) for tag, points in curves.items()}


CURVE_ORDER = ["train/loss", "train/loss_sup", "train/loss_u", "train/loss_ip", "train/loss_tkd", "train/loss_dkd",
               "train/conf_frac", "train/tau", "train/lr"]


def make_plots(table, entries, lines, out: Path) -> list:
    """PNG files under <out>/<table>/: per-case Dice of every row over all seeds, training curves per row (seeds
    overlaid), and for table5 Dice against the dropout-rate gap. Returns ``[(title, [(label, path)])]``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder = out / table
    folder.mkdir(parents=True, exist_ok=True)
    seeds = sorted({seed for _, seed, _ in entries})
    colors = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(seeds)}
    plots = []

    lists = list(dict.fromkeys(l["list"] for l in lines))
    fig, axes = plt.subplots(1, len(lists), figsize=(max(6, 1.3 * len(lines) / len(lists) + 2) * len(lists), 4.8),
                             squeeze=False)
    for ax, list_name in zip(axes[0], lists):
        rows = [l for l in lines if l["list"] == list_name]
        for x, line in enumerate(rows):
            per_seed = {seed: per_case_dice(run, list_name) for row, seed, run in entries if row["key"] == line["key"]}
            values = [v for vs in per_seed.values() for v in vs]
            if values:
                ax.boxplot([values], positions=[x], widths=0.5, showfliers=False)
            for i, (seed, vs) in enumerate(per_seed.items()):
                ax.scatter([x - 0.2 + 0.4 * (i + 0.5) / len(per_seed)] * len(vs), vs, s=12, color=colors[seed],
                           alpha=0.8, label=f"seed {seed}" if x == 0 else None, zorder=3)
            if not math.isnan(line["paper_dice"]):
                ax.plot([x - 0.3, x + 0.3], [line["paper_dice"]] * 2, color="red", lw=2,
                        label="paper (mean)" if not ax.get_legend_handles_labels()[1].count("paper (mean)") else None)
        ax.set_xticks(range(len(rows)), [l["row"] for l in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Dice per case (%)")
        ax.set_title(f"{table}: {list_name}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "dice_per_case.png", dpi=110)
    plt.close(fig)
    plots.append(("Per-case Dice, every seed (box over all seeds' cases, points coloured by seed; red: the "
                  "paper's mean)", [("dice_per_case.png", f"{table}/dice_per_case.png")]))

    curve_files = []
    for key in dict.fromkeys(row["key"] for row, _, _ in entries):
        per_seed = {seed: training_curves(run.run_dir) for row, seed, run in entries if row["key"] == key}
        tags = sorted({t for c in per_seed.values() for t in c},
                      key=lambda t: (CURVE_ORDER.index(t) if t in CURVE_ORDER else len(CURVE_ORDER), t))
        if not tags:
            continue
        cols = 3
        fig, axes = plt.subplots(math.ceil(len(tags) / cols), cols, figsize=(12, 2.6 * math.ceil(len(tags) / cols)),
                                 squeeze=False)
        for ax, tag in zip(axes.flat, tags):
            for seed, curves in per_seed.items():
                if tag in curves:
                    ax.plot(*curves[tag], color=colors[seed], lw=1, label=f"seed {seed}")
            ax.set_title(tag, fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            ax.tick_params(labelsize=7)
            if tag.startswith("train/loss"):
                ax.set_yscale("log") if all(min(c[tag][1]) > 0 for c in per_seed.values() if tag in c) else None
        for ax in list(axes.flat)[len(tags):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        label = next(row["row"] for row, _, _ in entries if row["key"] == key)
        fig.suptitle(f"{table}: {label}: training curves", fontsize=10)
        fig.tight_layout()
        fig.savefig(folder / f"curves_{key}.png", dpi=90)
        plt.close(fig)
        curve_files.append((key, f"{table}/curves_{key}.png"))
    if curve_files:
        plots.append(("Training curves (every train/* scalar: loss terms, confident fraction conf_frac, tau, lr; "
                      "seeds overlaid)", curve_files))

    gap_lines = [l for l in lines if l["gap"] != ""]
    if gap_lines:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for line in gap_lines:
            for row, seed, run in entries:
                summary = run.summary(line["list"]) if row["key"] == line["key"] else None
                if summary:
                    ax.scatter(line["gap"], summary["dice"] * 100, color=colors[seed], s=14, alpha=0.7)
        measured = [l for l in gap_lines if l["dice_n"]]
        if measured:
            ax.errorbar([l["gap"] for l in measured], [l["dice_mean"] for l in measured],
                        yerr=[0 if math.isnan(l["dice_std"]) else l["dice_std"] for l in measured], fmt="o-",
                        color="black", capsize=3, label="this repository, mean ± std")
        ax.plot([l["gap"] for l in gap_lines], [l["paper_dice"] for l in gap_lines], "s--", color="red", label="paper")
        ax.set_xlabel("dropout-rate gap (P_s rate - P_w rate)")
        ax.set_ylabel("Dice (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "dice_vs_gap.png", dpi=110)
        plt.close(fig)
        plots.append(("Dice against the dropout-rate gap (points: seeds)", [("dice_vs_gap.png",
                                                                             f"{table}/dice_vs_gap.png")]))
    return plots

