"""The rows of the paper's tables, as data: one dict per row (docs/REPRODUCE.md, "Rows are data").

Each row: table, key (in run-folder and file names), row (its label), task, train (the training script in code/),
flags (training flags), lists (the lists its final checkpoint is evaluated on), paper ({list: (Dice %, Jaccard %,
95HD, ASD)}, only where the paper prints the figures); optional: test_flags, root (the data root when no
--la_root / --acdc_root / LA_ROOT / ACDC_ROOT is given), gap (Table V), cml (no --preset). A table's title and
note are in TITLES and NOTES; another table or method is more dicts here.
"""
import math

TABLES = ("table1", "table2", "table4", "table5", "fig5")
TITLES = {
    "table1": "Table I: LA, 4 / 8 / 16 labeled cases, V-Net supervised and CrossMatch; CML at 8",
    "table2": "Table II: ACDC, 3 / 7 labeled patients, U-Net supervised, CrossMatch and CML",
    "table4": "Table IV: LA 8 labeled, the eta sweep (the paper's Table IV) and L_ip / L_tkd / L_dkd switched off",
    "table5": "Table V: LA 8 labeled, weak / strong feature-dropout rates",
    "fig5": "Fig. 5: LA 8 labeled, dropout types",
    "demo": "Demo: synthetic LA-format data, supervised against CrossMatch (not a reproduction)",
}
NOTES = {
    "table1": "The paper's figures: its Table I (V-Net rows and \"Ours\"), final weights, LA test.list. The CML row's "
              "are CML's own (its Table 1: Dice, 95HD, ASD; its release picks the best checkpoint on test.list).",
    "table2": "The paper's figures: its Table II (U-Net rows and \"Ours\"), which reports the validation set: they "
              "apply to val.list. test.list (the 20 patients BCP, AD-MT and ABD report) has no CrossMatch figure; the CML "
              "rows' figures are CML's own Table 2 (Dice, 95HD, ASD), measured on that split.",
    "table4": "The paper's Table IV is the eta sweep (its figures beside the eta rows). The switch-off rows (this "
              "repository's issues call them \"Table IV\" too) and their pairwise combinations have no paper "
              "figure (\"-\"); all three off leaves L_sup only and is not run.",
    "table5": "The paper's figures: its Table V (bottom = P_w rate, top = P_s rate, gap = top - bottom); equal rates "
              "are \"UniMatch plus L_kd\".",
    "fig5": "The paper shows Fig. 5 only as a bar chart (4, 8 and 16 labels): no figure in its text, so the paper "
            "column is \"-\". Only the 8-label split is run here.",
    "demo": "Synthetic volumes (code/make_synthetic.py), tiny patches and few iterations: the machinery of the real "
            "tables, on a CPU in minutes. The numbers say nothing about the paper.",
}

LA_TEST, ACDC_LISTS = ["test.list"], ["val.list", "test.list"]
TABLE1 = {(4, "supervised"): (43.32, 31.43, 40.19, 12.13), (4, "crossmatch"): (88.96, 80.21, 7.75, 2.38),
          (8, "supervised"): (79.99, 68.12, 21.11, 5.48), (8, "crossmatch"): (91.33, 84.11, 5.29, 1.53),
          (16, "supervised"): (86.03, 76.06, 14.26, 3.51), (16, "crossmatch"): (91.61, 84.57, 5.36, 1.57)}
TABLE2 = {(3, "supervised"): (47.83, 37.01, 31.16, 12.62), (3, "crossmatch"): (88.27, 80.17, 1.53, 0.46),
          (7, "supervised"): (79.41, 68.11, 9.35, 2.70), (7, "crossmatch"): (89.08, 81.44, 1.52, 0.52)}
TABLE4_ETA = {0.1: (90.88, 83.35, 7.80, 1.93), 0.15: (90.55, 82.92, 7.93, 2.51), 0.2: (91.03, 83.62, 6.44, 1.99),
              0.25: (91.28, 84.01, 5.77, 1.62), 0.3: (91.33, 84.11, 5.29, 1.53), 0.35: (90.78, 83.21, 6.91, 1.88),
              0.4: (87.25, 77.80, 9.80, 2.37), 0.45: (90.53, 82.78, 6.54, 1.83), 0.5: (87.78, 79.22, 6.76, 1.90)}
SWITCH_OFFS = [("ip",), ("tkd",), ("dkd",), ("ip", "tkd"), ("ip", "dkd"), ("tkd", "dkd")]
TABLE5 = {(0.5, 0.5): (91.20, 83.87, 5.41, 1.80), (0.375, 0.625): (91.07, 83.65, 5.47, 1.59),
          (0.25, 0.75): (91.33, 84.11, 5.29, 1.53), (0.125, 0.875): (90.22, 82.32, 6.59, 1.76)}
NET = {"la": "V-Net", "acdc": "U-Net"}
DEMO_LA_TRAIN = ["--labelnum", "2", "--max_iterations", "120", "--patch_size", "32", "32", "16", "--base_lr", "3e-3",
                 "--save_every", "40", "--log_every", "4", "--image_every", "40", "--num_workers", "0"]
DEMO_LA_TEST = ["--stride_xy", "16", "--stride_z", "8", "--sw_batch", "4"]


def _method_row(table, task, n, method, paper_list, figures):
    label = f"{NET[task]} supervised" if method == "supervised" else "CrossMatch"
    return dict(table=table, key=f"{task}{n}_{method}", row=f"{task.upper()} {n} labeled, {label}", task=task,
                train=f"train_{task}.py", flags=["--labelnum", str(n), "--method", method],
                lists=LA_TEST if task == "la" else ACDC_LISTS, paper={paper_list: figures})


def _la8_row(table, key, row, flags, paper=None, **more):
    return dict(table=table, key=key, row=row, task="la", train="train_la.py", flags=["--labelnum", "8", *flags],
                lists=LA_TEST, paper={"test.list": paper} if paper else {}, **more)


ROWS = [
    *(_method_row("table1", "la", n, m, "test.list", TABLE1[n, m]) for n in (4, 8, 16)
      for m in ("supervised", "crossmatch")),
    *(_method_row("table2", "acdc", n, m, "val.list", TABLE2[n, m]) for n in (3, 7)
      for m in ("supervised", "crossmatch")),
    *(_la8_row("table4", f"eta{eta}", f"eta = {eta}", ["--eta", str(eta)], figures)
      for eta, figures in TABLE4_ETA.items()),
    *(_la8_row("table4", "no_" + "_".join(off), " and ".join(f"L_{t}" for t in off) + " off",
               [f"--no_{t}" for t in off]) for off in SWITCH_OFFS),
    *(_la8_row("table5", f"drop{w}-{s}", f"P_w {w} / P_s {s} (gap {s - w:.2f})",
               ["--drop_weak", str(w), "--drop_strong", str(s)], figures, gap=s - w)
      for (w, s), figures in TABLE5.items()),
    *(_la8_row("fig5", kind, f"{kind} ({cls})", ["--dropout_type", kind])
      for kind, cls in (("dropout", "Dropout3d"), ("alpha", "AlphaDropout"), ("feature_alpha", "FeatureAlphaDropout"))),
    # the CML baseline (code/train_*_cml.py: no --preset; "paper" is CML's own paper, Tables 1 and 2, which print no
    # Jaccard; its ACDC split is the 20-patient test list)
    dict(table="table1", key="la8_cml", row="LA 8 labeled, CML (paper: CML's Table 1)", task="la", cml=True,
         train="train_la_cml.py", flags=["--labelnum", "8"], lists=LA_TEST,
         paper={"test.list": (90.36, math.nan, 6.06, 1.68)}),
    *(dict(table="table2", key=f"acdc{n}_cml", row=f"ACDC {n} labeled, CML (paper: CML's Table 2)", task="acdc",
           cml=True, train="train_acdc_cml.py", flags=["--labelnum", str(n)], lists=ACDC_LISTS,
           paper={"test.list": figures}) for n, figures in ((3, (88.53, math.nan, 1.87, 0.57)),
                                                             (7, (89.42, math.nan, 1.42, 0.52)))),
    *(dict(table="demo", key=m, row=f"LA 2 of 20 labeled (synthetic), {label}", task="la", train="train_la.py",
           flags=[*DEMO_LA_TRAIN, "--method", m], lists=LA_TEST, paper={}, test_flags=DEMO_LA_TEST,
           root="data/demo_LA") for m, label in (("supervised", "V-Net supervised"), ("crossmatch", "CrossMatch"))),
]
# ------------------------------------------------ more 3D data sets (docs/DATASETS.md): CML's Table 3, Pancreas-CT
# Not part of "all" (CrossMatch's own tables); their data is not in ../shared. Rows on train_la.py / train_la_cml.py
# with --dataset, data roots from --brats2019_root / --pancreas_root or $BRATS2019_ROOT / $PANCREAS_ROOT.
MORE_TABLES = ("table3", "pancreas")
TITLES.update({
    "table3": "CML's Table 3: BraTS2019 (whole tumour), 25 / 50 labeled scans (10 % / 20 %), V-Net supervised, "
              "CrossMatch and CML",
    "pancreas": "Pancreas-CT: 6 / 12 labeled scans (10 % / 20 %), V-Net supervised and CrossMatch",
})
NOTES.update({
    "table3": "The paper's figures are CML's own Table 3 (Dice, 95HD, ASD; no Jaccard) for the V-Net and CML rows, on "
              "the SSL4MIS test.txt (60 scans); CrossMatch reports no BraTS2019 figure. CrossMatch and supervised "
              "rows use LA's settings (train_la.py's defaults, patch 96 x 96 x 96); CML rows its BraTS2019 "
              "lengths (10k pre-training + 30k self-training), the rest of its LA settings (CML releases no "
              "BraTS2019 code).",
    "pancreas": "No paper figure: neither CrossMatch nor CML reports Pancreas-CT. LA's settings (train_la.py's "
                "defaults, patch 96 x 96 x 96), the MC-Net lists (62 training scans, 20 test scans).",
})
CML_TABLE3 = {25: ((78.32, math.nan, 22.29, 7.36), (85.26, math.nan, 9.08, 1.83)),
              50: ((80.18, math.nan, 20.57, 6.09), (86.63, math.nan, 7.83, 1.45))}  # (V-Net, Ours), CML's Table 3
MORE_ROOTS = {"brats2019": "data/BraTS2019", "pancreas": "data/Pancreas"}


def _dataset_row(table, dataset, name, n, share, method, paper=None):
    label = {"supervised": "V-Net supervised", "crossmatch": "CrossMatch", "cml": "CML"}[method]
    source = " (paper: CML's Table 3)" if paper else " (no paper figure)"
    test_list = "test.txt" if dataset == "brats2019" else "test.list"
    cml = ["--pre_iterations", "10000", "--max_iterations", "40000"] if method == "cml" else ["--method", method]
    return dict(table=table, key=f"{dataset.rstrip('2019')}{n}_{method}", row=f"{name} {n} labeled ({share}), {label}{source}",
                task="la", dataset=dataset, cml=method == "cml",
                train="train_la_cml.py" if method == "cml" else "train_la.py",
                flags=["--dataset", dataset, "--labelnum", str(n), *cml], lists=[test_list],
                paper={test_list: paper} if paper else {})


ROWS += [
    *(_dataset_row("table3", "brats2019", "BraTS2019", n, share, m, dict(supervised=vnet, cml=ours).get(m))
      for (n, share), (vnet, ours) in zip(((25, "10 %"), (50, "20 %")), CML_TABLE3.values())
      for m in ("supervised", "crossmatch", "cml")),
    *(_dataset_row("pancreas", "pancreas", "Pancreas-CT", n, share, m) for n, share in ((6, "10 %"), (12, "20 %"))
      for m in ("supervised", "crossmatch")),
]

DEMO_DATA = {"data/demo_LA": ["--task", "la", "--n_train", "20", "--n_test", "4", "--shape", "48", "48", "40"]}
DEMO_SEEDS = [1337, 1338]
