"""code/reproduce.py: the dry run of every table, the aggregation against summary.json files with known numbers
(a row missing a seed included), the README status block, a short demo end to end, and a run stopped mid-way
that the next call resumes while it skips the finished one (CPU, tiny synthetic data)."""
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reproduce
from reproduction.rows import TABLES
from reproduction.runs import plan
from test_real_data import ACDC_ROOT, needs_acdc

REPO = Path(__file__).resolve().parents[1]
# the demo's rows, made tiny: 16^3 patches
TINY = ["--patch_size", "16", "16", "16", "--log_every", "1", "--image_every", "1000"]


def reproduce_cmd(*args):
    return [sys.executable, str(REPO / "code" / "reproduce.py"), *map(str, args)]


def child_env():
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(*args, timeout=300):
    return subprocess.run(reproduce_cmd(*args), env=child_env(), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


def read_rows(path):
    with open(path) as f:
        return {(r["key"], r["list"]): r for r in csv.DictReader(f)}


# --------------------------------------------------------------------------------------------------- dry run
def test_dry_run_of_all_prints_every_run_and_touches_nothing(tmp_path):
    # no data at the roots (the same output on every machine): ACDC's length stays in epochs
    nowhere = tmp_path.parent / (tmp_path.name + "_nowhere")
    r = run("all", "--dry_run", "--runs_dir", tmp_path / "model", "--out", tmp_path / "results",
            "--la_root", nowhere / "LA", "--acdc_root", nowhere / "ACDC")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert list(tmp_path.iterdir()) == [] and not nowhere.exists()
    counts = dict(re.findall(r"^(table1|table2|table4|table5|fig5): \d+ rows x 3 seeds = (\d+) runs", out, re.M))
    assert counts == {"table1": "21", "table2": "18", "table4": "45", "table5": "12", "fig5": "9"}
    # table4's eta 0.3, table5's 0.25 / 0.75 and fig5's Dropout3d rows are table1's LA-8 CrossMatch runs
    assert re.search(r"^all: 96 distinct runs", out, re.M)
    assert len(re.findall(r"^# ", out, re.M)) == 96
    shared = "table1/la8_crossmatch seed 1338 (also table4/eta0.3, table5/drop0.25-0.75, fig5/dropout): to train"
    assert shared in out
    # every run trains, then evaluates: LA on test.list, ACDC on val.list and test.list
    assert out.count("python code/train_la.py") == 75 and out.count("python code/train_acdc.py") == 12
    assert out.count("python code/test_la.py") == 78 and out.count("python code/test_acdc.py") == 36
    # the CML baseline: its own scripts, no --preset, evaluated as CrossMatch is
    assert out.count("python code/train_la_cml.py") == 3 and out.count("python code/train_acdc_cml.py") == 6
    assert (f"train_la_cml.py --labelnum 8 --seed 1337 --exp table1_la8_cml_s1337 --out_dir {tmp_path / 'model'}"
            in out)
    folder = tmp_path / "model" / "LA_table5_drop0.125-0.875_paper_s1339_8_labeled"
    assert f"run folder {folder}" in out
    assert (f"train_la.py --labelnum 8 --drop_weak 0.125 --drop_strong 0.875 --preset paper --seed 1339 --exp "
            f"table5_drop0.125-0.875_paper_s1339 --out_dir {tmp_path / 'model'}") in out
    assert "--labelnum 8 --no_ip --no_dkd" in out and "--dropout_type feature_alpha" in out
    assert "table2/acdc7_supervised seed 1337" in out and "300 epochs / 40000 iterations each" in out


def test_a_short_trial_of_a_table_with_cml_rows_keeps_their_share_of_pre_training(tmp_path):
    # -- --max_iterations 500 reaches every row; CML's 2000 pre-training iterations (of 17000) would exceed it
    nowhere = tmp_path / "nowhere"
    r = run("table1", "--dry_run", "--seeds", "1337", "--runs_dir", tmp_path / "model", "--la_root", nowhere,
            "--", "--max_iterations", "500")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"train_la_cml.py --labelnum 8 .* --max_iterations 500 --pre_iterations 58$", r.stdout, re.M)
    assert "--pre_iterations" not in "".join(l for l in r.stdout.splitlines() if "train_la.py" in l)


@needs_acdc
def test_dry_run_on_the_real_acdc_data_turns_epochs_into_iterations(tmp_path):
    """With the real training list, 300 epochs over the unlabeled slices of the 7-labeled split are the
    29,400 iterations of docs/METHOD.md (98 per epoch); CML keeps its own 40,000."""
    r = run("table2", "--dry_run", "--runs_dir", tmp_path / "model", "--out", tmp_path / "results",
            "--acdc_root", ACDC_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    line = re.search(r"^table2: .* each;", r.stdout, re.M).group(0)
    assert "29400 iterations" in line and "40000 iterations" in line and "epochs" not in line


def test_rows_that_share_a_run_resolve_to_the_same_settings():
    """The runs shared between tables are shared because the training script resolves their flags to the same
    settings (not by name): --eta 0.3, --drop_weak 0.25 --drop_strong 0.75 and --dropout_type dropout are the
    defaults."""
    args = reproduce.parse_args(["all", "--seeds", "1"])
    runs, per_table = plan(args, list(TABLES))
    shared = {tuple(f"{r['table']}/{r['key']}" for r in run.rows) for run in runs if len(run.rows) > 1}
    assert shared == {("table1/la8_crossmatch", "table4/eta0.3", "table5/drop0.25-0.75", "fig5/dropout")}
    assert len({run.run_dir for run in runs}) == len(runs) == 32


# ------------------------------------------------------------------------------------------------ aggregation
KNOWN = {  # seed -> (dice, jaccard, hd95, asd) of summary.json; None: no summary (the seed is missing)
    "supervised": {1: (0.60, 0.45, 10.0, 3.0), 2: (0.70, 0.55, 12.0, 4.0), 3: None},
    "crossmatch": {1: (0.80, 0.70, 4.0, 1.0), 2: (0.90, 0.80, 6.0, 2.0), 3: (0.85, 0.75, None, None)},
}


def fake_run(run, values, n_cases=2, seconds=30.0):
    """A finished run folder as the training and test scripts leave it, with the given summary."""
    from torch.utils.tensorboard import SummaryWriter
    d = run.run_dir
    d.mkdir(parents=True)
    iterations = run.config["max_iterations"]
    (d / "config.json").write_text(json.dumps({"args": run.config, "git_commit": "abc123", "device": "cpu",
                                               "versions": {"torch": "2.13.0"}}))
    (d / f"iter_{iterations}.pth").write_bytes(b"")
    (d / "log.txt").write_text(f"[10:00:00] done: {iterations} iterations in {seconds} s; final checkpoint x\n")
    with SummaryWriter(str(d)) as w:
        for it in range(1, iterations + 1, max(1, iterations // 20)):
            w.add_scalar("train/loss", 1.0 / it + run.seed, it)
            w.add_scalar("train/lr", 0.01 * (1 - it / iterations), it)
    if values is None:
        return
    dice, jac, hd, asd = values
    ev = d / "eval_test"
    ev.mkdir()
    summary = {"dice": dice, "jaccard": jac, "hd95": hd, "asd": asd, "n_cases": n_cases,
               "n_empty": int(hd is None) * n_cases, "n_empty_label": 0, "n_both_empty": 0,
               "checkpoint": str(d / f"iter_{iterations}.pth"), "final_checkpoint": True, "empty_distance": "nan"}
    (ev / "summary.json").write_text(json.dumps(summary))
    (ev / "metrics.csv").write_text("case,dice,jaccard,hd95,asd\n" + "".join(
        f"c{i},{dice + (i - 0.5) * 0.02},{jac},{hd if hd is not None else ''},{asd if asd is not None else ''}\n"
        for i in range(n_cases)))


def test_aggregation_of_known_summaries_with_a_missing_seed(syn_la, tmp_path):
    argv = ["--demo", "--seeds", "1", "2", "3", "--la_root", syn_la, "--runs_dir", tmp_path / "model", "--out",
            tmp_path / "results", "--aggregate_only"]
    args = reproduce.parse_args(list(map(str, argv)))
    runs, per_table = plan(args, ["demo"])
    assert len(runs) == 6
    for run in runs:
        fake_run(run, KNOWN[run.rows[0]["key"]][run.seed])
    assert reproduce.main(list(map(str, argv))) == 0

    rows = read_rows(tmp_path / "results" / "demo.csv")
    sup, cm = rows["supervised", "test.list"], rows["crossmatch", "test.list"]
    assert (sup["n_seeds"], sup["seeds"], sup["missing_seeds"]) == ("2", "1 2", "3")
    assert float(sup["dice_mean"]) == pytest.approx(65.0) and float(sup["dice_std"]) == pytest.approx(7.0711, abs=1e-4)
    assert float(sup["hd95_mean"]) == pytest.approx(11.0) and float(sup["hd95_std"]) == pytest.approx(1.4142, abs=1e-4)
    assert (cm["n_seeds"], cm["missing_seeds"]) == ("3", "")
    assert float(cm["dice_mean"]) == pytest.approx(85.0) and float(cm["dice_std"]) == pytest.approx(5.0)
    assert float(cm["jaccard_mean"]) == pytest.approx(75.0) and float(cm["jaccard_std"]) == pytest.approx(5.0)
    # seed 3 has no distance (empty predictions): the distance means rest on 2 seeds, and say so
    assert (cm["hd95_n"], float(cm["hd95_mean"]), float(cm["asd_mean"])) == ("2", 5.0, 1.5)
    assert (cm["n_cases"], cm["n_empty"]) == ("6", "2")
    # the best seed is never reported: the mean is, even when the best seed is far better
    assert float(cm["dice_mean"]) != 90.0

    md = (tmp_path / "results" / "demo.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| LA 2 of 20 labeled (synthetic), CrossMatch"))
    assert "| 3 | 85.00 ± 5.00 | 75.00 ± 5.00 | 5.00 ± 1.41 (n=2) | 1.50 ± 0.71 (n=2) | - | - | 0.5 |" in line
    line = next(l for l in md.splitlines() if l.startswith("| LA 2 of 20 labeled (synthetic), V-Net supervised"))
    assert "| 2 (missing 3) | 65.00 ± 7.07 |" in line
    assert "miss seeds" in md and "never the best seed" in md and "post-processing: none" in md
    assert "git commit of the runs abc123" in md and "iterations 120" in md
    assert "2 empty predictions, 0 empty labels, 0 both-empty cases over 10 evaluated cases" in md
    # minutes per run from the logs: 30 s for its 120 iterations -> 0.5 min
    assert "0.5 ± 0.0 over 6 runs" in md
    plots = tmp_path / "results" / "demo"
    assert {p.name for p in plots.iterdir()} == {"dice_per_case.png", "curves_supervised.png", "curves_crossmatch.png"}
    assert all(p.stat().st_size > 5000 for p in plots.iterdir())
    assert "](demo/dice_per_case.png)" in md and "](demo/curves_crossmatch.png)" in md

    # a run folder trained with other settings (say, before a row's flags changed) is never reported as this row
    odd = next(r for r in runs if r.rows[0]["key"] == "crossmatch" and r.seed == 3)
    config = json.loads((odd.run_dir / "config.json").read_text())
    config["args"]["labelnum"] = 4
    (odd.run_dir / "config.json").write_text(json.dumps(config))
    assert odd.state() == "conflict" and odd.conflicts() == ["--labelnum 4 -> 2"]
    assert reproduce.main(list(map(str, argv))) == 0
    cm = read_rows(tmp_path / "results" / "demo.csv")["crossmatch", "test.list"]
    assert (cm["n_seeds"], cm["missing_seeds"], float(cm["dice_mean"])) == ("2", "3", 85.0)


def test_readme_status_block_from_results(tmp_path, capsys):
    argv = ["table1", "--seeds", "1", "2", "--runs_dir", tmp_path / "model", "--out", tmp_path / "results",
            "--aggregate_only"]
    args = reproduce.parse_args(list(map(str, argv)))
    runs, _ = plan(args, ["table1"])
    for run in runs:
        if run.rows[0]["key"] == "la8_crossmatch":
            fake_run(run, (0.90 + 0.01 * run.seed, 0.8, 5.0, 1.5))
    reproduce.main(list(map(str, argv)))
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nintro\n", "\n## Next\n\ntext\n"
    readme.write_text(f"{before}<!-- status:begin -->\nold table\n<!-- status:end -->{after}")
    assert reproduce.main(["readme", "--readme", str(readme), "--out", str(tmp_path / "results")]) == 0
    text = readme.read_text()
    assert text.startswith(before + "<!-- status:begin -->\n") and text.endswith("<!-- status:end -->" + after)
    assert "old table" not in text
    block = text.split("<!-- status:begin -->\n")[1].split("<!-- status:end -->")[0]
    line = next(l for l in block.splitlines() if "LA 8 labeled, CrossMatch" in l)
    assert ("| Table I | LA 8 labeled, CrossMatch | test.list | 91.33 / 84.11 / 5.29 / 1.53 | 91.50 ± 0.71 / "
            "80.00 ± 0.00 / 5.00 ± 0.00 / 1.50 ± 0.00 | n = 2 seeds, final checkpoint") in line
    assert "[table1.md](results/table1.md)" in line
    assert "| Table I | LA 4 labeled, V-Net supervised | test.list | 43.32 / 31.43 / 40.19 / 12.13 | not yet measured" in block
    assert "| Table II | ACDC 7 labeled, CrossMatch | val.list | 89.08 / 81.44 / 1.52 / 0.52 | not yet measured" in block
    assert "| Table II | ACDC 7 labeled, CrossMatch | test.list | - | not yet measured" in block
    assert re.search(r"\| Table IV \| .* \| 9 of 15 rows with a figure \| not yet measured", block)
    # without the markers the README is left as it is
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="status:begin"):
        reproduce.main(["readme", "--readme", str(readme), "--out", str(tmp_path / "results")])
    assert readme.read_text() == "no markers\n"


# ----------------------------------------------------------------------------------------- runs, end to end
def test_short_demo_end_to_end(syn_la, tmp_path):
    """Two rows x three seeds, two runs at once: seed 1 trains and is evaluated for real; seed 2 is found
    finished (run folders with known summaries) and skipped; seed 3 of the supervised row fails (its latest.pth
    is damaged, so its --resume is refused) and is reported with its output's last lines while the others go
    on, and seed 3 of CrossMatch is found finished. The table holds mean and std over the seeds that finished, says
    which seed is missing, and the plots exist; the exit status is 1."""
    res = tmp_path / "results"
    argv = [*map(str, ["--demo", "--seeds", 1, 2, 3, "--jobs", 2, "--la_root", syn_la, "--runs_dir", tmp_path / "model",
                       "--out", res, "--", "--max_iterations", 2, *TINY])]
    runs, _ = plan(reproduce.parse_args(argv), ["demo"])
    by = {(r.rows[0]["key"], r.seed): r for r in runs}
    for key, seed in (("supervised", 2), ("crossmatch", 2), ("crossmatch", 3)):
        fake_run(by[key, seed], KNOWN[key][seed])
    by["supervised", 3].run_dir.mkdir(parents=True)
    (by["supervised", 3].run_dir / "latest.pth").write_bytes(b"not a checkpoint")
    r = run(*argv)
    assert r.returncode == 1, (r.stdout[-3000:], r.stderr[-3000:])
    assert "6 runs: 3 finished, 3 to do, 2 at once" in r.stdout
    assert re.search(r"FAILED: demo/supervised seed 3 \(exit 1\): python code/train_la.py .*--resume", r.stdout)
    assert "last lines of" in r.stdout and "cannot be read" in r.stdout
    assert "runs: 5/6 done, 0 running, 0 left, 1 failed; rows: 1/2 done" in r.stdout

    rows = read_rows(res / "demo.csv")
    for key in ("supervised", "crossmatch"):
        real = json.loads((by[key, 1].run_dir / "eval_test" / "summary.json").read_text())
        assert real["final_checkpoint"] and real["n_cases"] == 2
        assert re.fullmatch(rf"LA_demo_{key}_paper_s1_x[0-9a-f]{{6}}_2_labeled", by[key, 1].run_dir.name)
        dice = [100 * real["dice"]] + [100 * KNOWN[key][s][0] for s in (2, 3) if KNOWN[key][s]]
        line = rows[key, "test.list"]
        assert line["n_seeds"] == str(len(dice)) and line["iterations"] == "2"
        assert float(line["dice_mean"]) == pytest.approx(statistics.mean(dice), abs=1e-4)
        assert float(line["dice_std"]) == pytest.approx(statistics.stdev(dice), abs=1e-4)
    assert rows["supervised", "test.list"]["missing_seeds"] == "3"
    md = (res / "demo.md").read_text()
    assert "not the paper's length" in md and "--max_iterations 2" in md and "| 2 (missing 3) |" in md
    assert {p.name for p in (res / "demo").iterdir()} == {"dice_per_case.png", "curves_supervised.png",
                                                         "curves_crossmatch.png"}
    log = (by["crossmatch", 1].run_dir / "reproduce_output.log").read_text()
    assert "python code/train_la.py" in log and "python code/test_la.py" in log


def test_a_stopped_run_is_resumed_and_finished_runs_are_skipped(syn_la, tmp_path):
    """reproduce.py is stopped (SIGTERM) while the CrossMatch run trains: it stops its child, which writes
    latest.pth at its last iteration. The next call resumes that run (--resume) and skips the finished one (a run folder with its final
    checkpoint and summary), whose files stay untouched; then both are finished."""
    argv = [*map(str, ["--demo", "--seeds", 7, "--la_root", syn_la, "--runs_dir", tmp_path / "model", "--out",
                       tmp_path / "results", "--", "--max_iterations", 8, "--save_every", 3, *TINY])]
    runs, _ = plan(reproduce.parse_args(argv), ["demo"])
    sup, cm = (next(r for r in runs if r.rows[0]["key"] == key) for key in ("supervised", "crossmatch"))
    fake_run(sup, (0.5, 0.4, 3.0, 1.0))
    assert [r.state() for r in runs] == ["finished", "train"]
    sup_files = {p: p.stat().st_mtime_ns for p in sup.run_dir.rglob("*")}

    latest = cm.run_dir / "latest.pth"
    proc = subprocess.Popen(reproduce_cmd(*argv), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not latest.is_file():
            time.sleep(0.02)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "2 runs: 1 finished, 1 to do" in out, out
    time.sleep(1)  # the child was stopped with reproduce.py: nothing goes on training
    assert cm.state() == "resume" and not (cm.run_dir / "iter_8.pth").exists()

    r = run(*argv)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "2 runs: 1 finished, 1 to do" in r.stdout
    log = (cm.run_dir / "reproduce_output.log").read_text()
    assert re.search(r"\(resume, .*train_la\.py .*--resume\n", log)
    # the child stopped at the end of its iteration, latest.pth written there (utils/signals.py), and resumed there
    stopped = re.search(r"stopped by SIGTERM after iteration (\d) of 8; .*latest\.pth holds iteration \1", log)
    assert stopped and re.search(rf"iterations {stopped.group(1)} -> 8", log), log[-3000:]
    assert [r.state() for r in runs] == ["finished", "finished"]
    assert {p: p.stat().st_mtime_ns for p in sup.run_dir.rglob("*")} == sup_files
    rows = read_rows(tmp_path / "results" / "demo.csv")
    assert rows["supervised", "test.list"]["dice_mean"] == "50.0" and rows["crossmatch", "test.list"]["n_seeds"] == "1"


# ---------------------------------------------------------------------------------------------- --launcher slurm
def test_dry_run_with_the_slurm_launcher_prints_the_job_script(syn_la, tmp_path):
    """--dry_run --launcher slurm prints the commands as the local launcher does, then the #SBATCH lines the job
    array would get (submitit's own job script): the array throttled by --jobs, the time from the runs' length
    unless given, CPUs from the loader's workers, GPUs, the pass-through, the set-up; nothing is submitted.
    The real Slurm cases are tests/slurm.py's."""
    base = ["--demo", "--seeds", "1", "2", "--la_root", syn_la, "--runs_dir", tmp_path / "model", "--out",
            tmp_path / "results", "--dry_run", "--launcher", "slurm"]
    r = run(*base, "--jobs", 3, "--slurm_partition", "gpu", "--slurm_mem", "32G", "--slurm_extra", "constraint=a100",
            "--slurm_extra", "signal_delay_s=120")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "python code/train_la.py --labelnum 2 --max_iterations 120" in r.stdout  # the local dry run's lines
    lines = set(r.stdout.splitlines())
    # 4 runs, 3 at once; the demo's 120 iterations at 0.315 s are 1 minute, + 15; 0 workers + 2 CPUs; 1 GPU
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --time=16", "#SBATCH --cpus-per-task=2", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --partition=gpu", "#SBATCH --mem=32G", "#SBATCH --constraint=a100",
                 "#SBATCH --signal=USR2@120", "#SBATCH --open-mode=append",
                 "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK  # srun 22.05-23.02 does not inherit it",
                 f"export PYTHONPATH={REPO / 'code'}${{PYTHONPATH:+:$PYTHONPATH}}"):
        assert "  " + line in lines, (line, r.stdout[-2500:])
    assert f"#SBATCH --output={tmp_path / 'model' / 'slurm_jobs'}/%A_%a_0_log.out" in r.stdout
    assert not (tmp_path / "model").exists()
    r = run(*base, "--slurm_time", 45, "--slurm_gpus", 0, "--slurm_cpus", 6)
    assert "  #SBATCH --time=45" in r.stdout and "  #SBATCH --cpus-per-task=6" in r.stdout
    assert "  #SBATCH --array=0-3%4" in r.stdout  # no --jobs: not throttled (submitit's 256)
    assert "gpus-per-node" not in r.stdout


@pytest.mark.parametrize("flags, message", [
    (["--slurm_time", "30"], "--slurm_time: only with --launcher slurm"),
    (["--launcher", "slurm", "--gpus", "0,1"], "--gpus: only with --launcher local"),
    (["--launcher", "slurm", "--slurm_extra", "constraint"], "--slurm_extra constraint: expected KEY=VALUE"),
])
def test_slurm_flags_refused_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--demo", *flags])
    assert message in capsys.readouterr().err


def test_a_job_requeued_more_than_the_limit_does_not_run_again(syn_la, tmp_path, monkeypatch):
    """The job function (what a Slurm job runs) refuses a start after more than --slurm_requeues requeues
    (SLURM_RESTART_COUNT), with a line in the run's log that reproduce.py shows; nothing is trained."""
    from reproduction.slurm import RunJob
    args = reproduce.parse_args([*map(str, ["--demo", "--seeds", 1, "--la_root", syn_la, "--runs_dir", tmp_path])])
    run = plan(args, ["demo"])[0][0]
    run.run_dir.mkdir(parents=True)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "4")
    with pytest.raises(RuntimeError, match="requeued 4 times, more than --slurm_requeues 3: not run again"):
        RunJob(run, 3, 90)()
    log = (run.run_dir / "reproduce_output.log").read_text()
    assert "(Slurm job 41 on" in log and "start 5): requeued 4 times" in log
    assert sorted(p.name for p in run.run_dir.iterdir()) == ["reproduce_output.log"]


def test_a_bad_slurm_extra_value_is_one_line(syn_la, tmp_path):
    r = run("--demo", "--seeds", 1, "--la_root", syn_la, "--runs_dir", tmp_path / "model", "--dry_run", "--launcher",
            "slurm", "--slurm_extra", "signal_delay_s=soon")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --slurm_extra signal_delay_s=soon: expected a whole number (submitit's signal_delay_s)"], r.stderr
