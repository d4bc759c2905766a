"""The tables: each row's seeds reduced to mean / std / n against the paper's figures (``table_lines``), the facts
of the runs (commits, devices, minutes), written as <out>/<table>.csv and .md with the plots (``write_table``)."""
import csv
import json
import math
import statistics

from reproduction.plots import make_plots
from reproduction.rows import NOTES, TITLES
from reproduction.runs import logged_training_seconds

METRICS = ("dice", "jaccard", "hd95", "asd")
HEADS = {"dice": "Dice (%)", "jaccard": "Jaccard (%)", "hd95": "95HD (voxel)", "asd": "ASD (voxel)"}
PERCENT = {"dice", "jaccard"}  # stored as fractions in summary.json, shown in % like the paper
def seed_stats(values) -> tuple:
    """``(mean, sample std (n - 1), n)`` of the values that are not None or NaN; NaN where undefined."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    mean = statistics.mean(v) if v else math.nan
    return mean, statistics.stdev(v) if len(v) > 1 else math.nan, len(v)


def fmt(value, digits=2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def table_lines(table, entries, seeds) -> list:
    """A dict per (row, list): the seeds' summaries reduced to mean / std / n per metric, the paper's figure and
    the difference (ours - paper)."""
    by_row = {}
    for row, seed, run in entries:
        by_row.setdefault(row["key"], (row, {}))[1][seed] = run
    lines = []
    for row, runs in by_row.values():
        for list_name in row["lists"]:
            summaries = {seed: run.summary(list_name) for seed, run in runs.items()}
            found = {s: v for s, v in summaries.items() if v is not None}
            paper = row["paper"].get(list_name)
            line = dict(table=table, key=row["key"], row=row["row"], task=row["task"], list=list_name,
                        seeds=" ".join(map(str, sorted(found))),
                        missing_seeds=" ".join(str(s) for s in seeds if s not in found), n_seeds=len(found))
            for i, m in enumerate(METRICS):
                scale = 100.0 if m in PERCENT else 1.0
                mean, std, n = seed_stats([v.get(m) * scale if v.get(m) is not None else None for v in found.values()])
                line.update({f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n,
                             f"paper_{m}": paper[i] if paper else math.nan,
                             f"diff_{m}": mean - paper[i] if paper else math.nan})
            line["n_cases"] = sum(v["n_cases"] for v in found.values())
            for k in ("n_empty", "n_empty_label", "n_both_empty"):
                line[k] = sum(v.get(k, 0) for v in found.values())
            line["empty_distance"] = " ".join(sorted({v.get("empty_distance", "?") for v in found.values()}))
            configs = [r.config for r in runs.values()]
            line["preset"] = " ".join(sorted({str(c.get("preset")) for c in configs}))
            line["iterations"] = " ".join(sorted({str(read_config(r).get("args", {}).get("max_iterations"))
                                                  for s, r in runs.items() if s in found}))
            line["train_minutes"] = seed_stats([run_minutes(runs[s]) for s in found])[0]
            line["gap"] = row.get("gap", "")
            lines.append(line)
    return lines


def read_config(run) -> dict:
    try:
        return json.loads((run.run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def run_minutes(run):
    """Training minutes of a run from its log.txt; a resumed run: its pieces' speed times its length."""
    logged = logged_training_seconds(run.run_dir)
    iterations = read_config(run).get("args", {}).get("max_iterations")
    return logged[0] / logged[1] * iterations / 60 if logged and logged[1] and iterations else None


def run_facts(entries) -> dict:
    """What the header says about the runs that finished: commits, devices, iterations, minutes per run."""
    runs = {id(run): run for _, _, run in entries if run.final_checkpoint()}.values()
    configs = [read_config(r) for r in runs]
    per_run = [m for m in map(run_minutes, runs) if m is not None]
    devices = set()
    for r, c in zip(runs, configs):
        record = r.run_dir / "reproduce.json"
        name = json.loads(record.read_text())[-1].get("device_name") if record.is_file() else None
        devices.add(str(c.get("device", "?")) + (f" ({name})" if name else ""))
    return dict(commits=sorted({c.get("git_commit", "?") for c in configs}),
                devices=sorted(devices), torch=sorted({c.get("versions", {}).get("torch", "?") for c in configs}),
                iterations=sorted({str(c.get("args", {}).get("max_iterations")) for c in configs}),
                minutes=seed_stats(per_run) if per_run else None)


def cell(line, m) -> str:
    mean, std, n = line[f"{m}_mean"], line[f"{m}_std"], line[f"{m}_n"]
    if not n:
        return "not yet measured" if not line["n_seeds"] else "- (no distance)"
    text = f"{fmt(mean)} ± {fmt(std)}" if n > 1 else f"{fmt(mean)}"
    return text + (f" (n={n})" if n != line["n_seeds"] else "")


def write_table(table, entries, args) -> tuple:
    """<out>/<table>.csv and <out>/<table>.md (with the plots under <out>/<table>/); returns their paths."""
    lines = table_lines(table, entries, args.seeds)
    if not lines:
        return None, None
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = args.out / f"{table}.csv", args.out / f"{table}.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lines[0]) + ["extra_flags"], lineterminator="\n")
        writer.writeheader()
        for line in lines:
            writer.writerow({**{k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else
                                    ("" if isinstance(v, float) else v)) for k, v in line.items()},
                             "extra_flags": " ".join(args.extra)})
    facts = run_facts(entries)
    plots = make_plots(table, entries, lines, args.out)
    md_path.write_text(markdown(table, lines, facts, plots, args))
    return csv_path, md_path


def command_line(table, args) -> str:
    return " ".join(["python code/reproduce.py", "--demo" if table == "demo" else table, "--seeds", *map(str, args.seeds),
                     "--preset", args.preset, *(["--", *args.extra] if args.extra else [])])


def markdown(table, lines, facts, plots, args) -> str:
    lists = sorted({l["list"] for l in lines})
    n_cases = sum(l["n_cases"] for l in lines)
    empty = {k: sum(l[k] for l in lines) for k in ("n_empty", "n_empty_label", "n_both_empty")}
    policy = " ".join(sorted({l["empty_distance"] for l in lines if l["empty_distance"]})) or "nan"
    minutes = facts["minutes"]
    out = [f"# {TITLES[table]}", "",
           f"Generated by `{command_line(table, args)}`. " + NOTES[table], ""]
    if args.extra:
        trial = any(f in args.extra for f in ("--max_iterations", "--epochs"))
        out += [f"**Extra training flags: `{' '.join(args.extra)}`**" + (
            " -- these runs are not the paper's length: a trial, not a reproduction." if trial else "."), ""]
    out += ["Protocol:", "",
            f"- lists: {', '.join(lists)}; checkpoint: the final one (`iter_<max_iterations>.pth`), never a best one; "
            "post-processing: none",
            f"- empty cases (`--empty_distance {policy}`): an empty prediction or empty label scores Dice 0 and has "
            f"no 95HD / ASD (left out of the distance means; a seed's n shows it); in these results "
            f"{empty['n_empty']} empty predictions, {empty['n_empty_label']} empty labels, {empty['n_both_empty']} "
            f"both-empty cases over {n_cases} evaluated cases",
            f"- preset {args.preset}; iterations {', '.join(facts['iterations']) or '-'}; git commit of the runs "
            f"{', '.join(facts['commits']) or '-'}; device {', '.join(facts['devices']) or '-'}; torch "
            f"{', '.join(facts['torch']) or '-'}",
            "- training minutes per run (from the runs' log.txt, scaled to the full length for resumed runs): "
            + (f"{minutes[0]:.1f}" + (f" ± {minutes[1]:.1f}" if minutes[2] > 1 else "") + f" over {minutes[2]} runs"
               if minutes else "not yet measured"),
            "- values: Dice and Jaccard in % (like the paper), 95HD and ASD in voxels; mean ± sample standard "
            "deviation over the seeds that finished (n seeds shown; never the best seed); diff = this repository "
            "- the paper", ""]
    head = ["row", "list", "n seeds"] + [HEADS[m] for m in METRICS] + ["paper: Dice / Jaccard / 95HD / ASD",
                                                                        "diff: Dice / Jaccard / 95HD / ASD",
                                                                        "training min / run"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for l in lines:
        paper = " / ".join(fmt(l[f"paper_{m}"]) for m in METRICS) if not math.isnan(l["paper_dice"]) else "-"
        diff = (" / ".join(fmt(l[f"diff_{m}"]) for m in METRICS)
                if not math.isnan(l["paper_dice"]) and l["n_seeds"] else "-")
        n = f"{l['n_seeds']}" + (f" (missing {l['missing_seeds']})" if l["missing_seeds"] else "")
        out.append("| " + " | ".join([l["row"], l["list"], n, *(cell(l, m) for m in METRICS), paper, diff,
                                      fmt(l["train_minutes"], 1)]) + " |")
    missing = [l for l in lines if l["missing_seeds"]]
    if missing:
        out += ["", f"{len(missing)} of {len(lines)} lines miss seeds (their means rest on fewer runs): "
                + "; ".join(f"{l['row']} ({l['list']}): {l['missing_seeds']}" for l in missing) + "."]
    if plots:
        out += ["", "## Plots", ""]
        for title, files in plots:
            out.append(f"{title}: " + ", ".join(f"[{label}]({path})" for label, path in files))
        out += [""] + [f"![{title}]({files[0][1]})" for title, files in plots if len(files) == 1]
    return "\n".join(out) + "\n"

