"""``reproduce.py readme``: README.md's status block, rewritten from the tables in results/ (each Table I / II row
with the paper's figure beside this repository's, a line per ablation table)."""
import csv
import math
import os
from pathlib import Path

from reproduction.aggregate import METRICS
from reproduction.rows import ROWS, TABLES, TITLES

STATUS_BEGIN, STATUS_END = "<!-- status:begin -->", "<!-- status:end -->"
PAPER_NAMES = {"table1": "Table I", "table2": "Table II", "table4": "Table IV", "table5": "Table V", "fig5": "Fig. 5"}


def read_csv(path: Path) -> list:
    with open(path) as f:
        return list(csv.DictReader(f))


def status_block(out: Path, base: Path) -> str:
    """The README status table: each Table I / II row with the paper's figure beside this repository's (with its
    protocol and n seeds) or "not yet measured"; a line per ablation table. Links are relative to ``base``."""
    lines = ["| paper | row | list | paper: Dice / Jaccard / 95HD / ASD | this repository: Dice / Jaccard / 95HD / "
             "ASD | protocol |", "|---|---|---|---|---|---|"]
    for table in TABLES:
        rows = [r for r in ROWS if r["table"] == table]
        path = out / f"{table}.csv"
        measured = {(r["key"], r["list"]): r for r in read_csv(path) if int(r["n_seeds"])} if path.is_file() else {}
        link = f"[{table}.md]({os.path.relpath(out / f'{table}.md', base)})"
        if table in ("table4", "table5", "fig5"):  # ablations: one line, the table itself in results/
            n = len({key for key, _ in measured})
            lines.append(f"| {PAPER_NAMES[table]} | {TITLES[table].split(': ', 1)[1]} | test.list | "
                         f"{sum(bool(r['paper']) for r in rows)} of {len(rows)} rows with a figure | "
                         + (f"{n} of {len(rows)} rows measured: {link}" if n else "not yet measured") + " | |")
            continue
        for row in rows:
            for list_name in row["lists"]:
                paper, r = row["paper"].get(list_name), measured.get((row["key"], list_name))
                if r:
                    ours = " / ".join((f"{float(r[m + '_mean']):.2f}" + (f" ± {float(r[m + '_std']):.2f}"
                                                                           if r[m + "_std"] else ""))
                                      if r[m + "_mean"] else "-" for m in METRICS)
                    protocol = (f"n = {r['n_seeds']} seeds, final checkpoint, no post-processing, preset "
                                f"{r['preset']}, {r['iterations']} iterations ({link})"
                                + (f"; extra flags `{r['extra_flags']}`: a trial" if r["extra_flags"] else ""))
                else:
                    ours, protocol = "not yet measured", ""
                figures = " / ".join("-" if math.isnan(v) else f"{v:.2f}" for v in paper) if paper else "-"
                lines.append(f"| {PAPER_NAMES[table]} | {row['row']} | {list_name} | {figures} | {ours} | {protocol} |")
    return "\n".join(lines)


def update_readme(readme: Path, out: Path) -> None:
    text = readme.read_text()
    if text.count(STATUS_BEGIN) != 1 or text.count(STATUS_END) != 1 or text.index(STATUS_BEGIN) > text.index(STATUS_END):
        raise SystemExit(f"error: {readme}: expected one line '{STATUS_BEGIN}' and, after it, one line "
                         f"'{STATUS_END}' around the status block; add them where the table should go")
    head, rest = text.split(STATUS_BEGIN, 1)
    _, tail = rest.split(STATUS_END, 1)
    readme.write_text(f"{head}{STATUS_BEGIN}\n{status_block(out, readme.parent)}\n{STATUS_END}{tail}")
    print(f"rewrote the status block of {readme} from {out}")

