"""Two CPU processes with Gloo through torchrun (DistributedDataParallel), two iterations of ACDC.

Checks: exit 0; rank 0 alone writes the run folder (one latest.pth, one final checkpoint, the log header
once); config.json records 2 processes and the effective batch 2 x --batch_size; the two ranks end with
bit-identical parameters and optimizer state (each rank dumps its own state through the
CROSSMATCH_DUMP_RANK_STATE test hook of utils/distributed.py); their batch-norm running statistics differ,
which shows that each rank trained on its own part of the batch.
"""
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils import distributed
from utils.checkpoint import load_checkpoint
from utils.sampler import TwoStreamBatchSampler
from utils.synthetic import make_acdc

CODE = Path(__file__).resolve().parents[1] / "code"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    root = make_acdc(base / "ACDC", n_train_patients=2, n_val=0, n_test=0, shape=(16, 48, 48), shape_jitter=0.0)
    dump = base / "dump"
    env = dict(os.environ, OMP_NUM_THREADS="1", **{distributed.DUMP_ENV: str(dump)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(CODE / "train_acdc.py"), "--root_path", str(root), "--out_dir", str(base / "runs"), "--exp", "ddp",
           "--labelnum", "1", "--patch_size", "48", "48", "--batch_size", "4", "--labeled_bs", "2",
           "--max_iterations", "2", "--save_every", "1", "--num_workers", "0", "--device", "cpu", "--deterministic"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=base)
    return res, base / "runs" / "ACDC_ddp_1_labeled", dump


def test_two_gloo_processes_train_and_stay_in_sync(ddp_run):
    res, run_dir, dump = ddp_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # rank 0 alone writes: one checkpoint pair, the log header once
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["iter_2.pth", "latest.pth"]
    assert not list(run_dir.glob("*.tmp")) and len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    log = (run_dir / "log.txt").read_text()
    assert log.count("ACDC crossmatch:") == 1 and "2+2 per batch x 2 process(es)" in log
    assert log.count("parameters and optimizer state identical on all processes") == 1
    assert log.count("done: 2 iterations") == 1
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["effective_batch_size"] == 8
    assert load_checkpoint(run_dir / "iter_2.pth")["world_size"] == 2

    # both ranks: identical parameters and optimizer state after 2 iterations
    r0, r1 = load_checkpoint(dump / "rank0.pth"), load_checkpoint(dump / "rank1.pth")
    params = [k for k in r0["model"] if "running_" not in k and "num_batches" not in k]
    assert len(params) > 50
    assert all(torch.equal(r0["model"][k], r1["model"][k]) for k in params)
    s0, s1 = r0["optimizer"]["state"], r1["optimizer"]["state"]
    assert s0.keys() == s1.keys() and len(s0) == len(params)
    assert all(torch.equal(s0[i][k], s1[i][k]) for i in s0 for k in s0[i] if torch.is_tensor(s0[i][k]))
    # training moved the weights, and rank 0's state is the saved one
    saved = load_checkpoint(run_dir / "iter_2.pth")["model"]
    assert all(torch.equal(saved[k], r0["model"][k]) for k in saved)
    # each rank normalised its own samples: running statistics differ between ranks
    stats = [k for k in r0["model"] if k.endswith("running_mean")]
    assert any(not torch.equal(r0["model"][k], r1["model"][k]) for k in stats)


def test_ranks_draw_disjoint_parts_of_each_batch():
    def batch(rank, it):
        s = TwoStreamBatchSampler(range(32), range(32, 64), 2, 2, seed=1337, num_iterations=4, rank=rank,
                                  world_size=2)
        return [i for i, _ in s.batch(it)]
    for it in range(4):
        assert not set(batch(0, it)) & set(batch(1, it))


def test_sync_bn_on_cpu_processes_is_refused(monkeypatch):
    import train_acdc
    from utils import run
    monkeypatch.setattr(distributed, "init_distributed", lambda device_flag: (0, 2, 0))
    args = train_acdc.parse_args(["--device", "cpu", "--sync_bn"])
    with pytest.raises(SystemExit, match="--sync_bn: SyncBatchNorm needs CUDA devices"):
        run.setup_process(args)


def _grad_worker(rank, port, out_dir):
    """One rank: the real train_acdc.train_iteration (two model calls, one backward) on a DDP model and on a
    plain local copy; the DDP gradient must be the mean over ranks of the local gradients."""
    import train_acdc
    from networks import build_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    args = train_acdc.parse_args(["--patch_size", "32", "32", "--batch_size", "4", "--labeled_bs", "2",
                                  "--max_iterations", "10", "--device", "cpu", "--conf_thresh", "0.3"])
    torch.manual_seed(0)
    base = build_model("acdc")
    local, ddp = copy.deepcopy(base), torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own samples
    batch = {k: torch.randn(2, 1, 32, 32, generator=g) for k in ("x_l", "x_w", "x_s1", "x_s2")}
    batch["y_l"] = torch.randint(0, 4, (2, 32, 32), generator=g)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for model in (local, ddp):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        train_acdc.train_iteration(model, opt, scaler, batch, 3, args, torch.device("cpu"), rank)
    worst = 0.0
    for p_local, p_ddp in zip(local.parameters(), ddp.module.parameters()):
        mean = p_local.grad.clone()
        dist.all_reduce(mean)
        mean /= 2
        worst = max(worst, (mean - p_ddp.grad).abs().max().item())
    same = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])
    ref = same.clone()
    dist.broadcast(ref, 0)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"worst": worst, "in_sync": bool(torch.equal(ref, same))}))
    dist.destroy_process_group()


def test_ddp_gradient_of_the_two_pass_iteration_is_the_mean_of_local_gradients(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_grad_worker, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["worst"] == 0.0 and res["in_sync"], res
