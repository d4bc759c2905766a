"""DistributedDataParallel on CPU processes with Gloo.

The torchrun test trains ACDC for two iterations with two processes and checks rank 0's run folder: rank 0
alone writes (one latest.pth, one final checkpoint, one tensorboard file, the log header once); config.json and
the checkpoints record 2 processes, the log the per-process batch 2+2 (effective batch 2 x 4); and the saved
weights, batch-norm statistics and optimizer state are exactly those of an in-process replay of the two ranks:
each rank's own batch and CutMix partners (sampler rank 0 / 1 of 2, partner_bs = unlabeled_bs as the default
--cutmix_partner second_batch asks) and dropout masks (seeded from its rank), the optimizer stepping with the mean
of the two ranks' gradients, the running statistics of rank 0's batches.
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

from utils import training
from utils.checkpoint import load_checkpoint
from utils.sampler import TwoStreamBatchSampler
from utils.synthetic import make_acdc

CODE = Path(__file__).resolve().parents[1] / "code"
TRAIN_FLAGS = ["--labelnum", "1", "--patch_size", "48", "48", "--batch_size", "4", "--labeled_bs", "2",
               "--max_iterations", "2", "--save_every", "1", "--num_workers", "0", "--device", "cpu",
               "--deterministic"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    root = make_acdc(base / "ACDC", n_train_patients=2, n_val=0, n_test=0, shape=(16, 48, 48), shape_jitter=0.0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(CODE / "train_acdc.py"), "--root_path", str(root), "--out_dir", str(base / "runs"), "--exp", "ddp",
           *TRAIN_FLAGS]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=base)
    return res, base / "runs" / "ACDC_ddp_1_labeled", root


def replay_two_ranks(root, monkeypatch):
    """Rank 0's model and optimizer after the run, computed in this process: per iteration, each rank's
    train_iteration on a copy of the model (its batch, its seeds), then one step with the mean gradient."""
    import train_acdc
    from networks import build_model
    from utils.data import TrainSet, read_list
    from utils.sampler import collate_two_stream

    args = train_acdc.parse_args(["--root_path", str(root), *TRAIN_FLAGS])
    names = read_list(root / "train_slices.list")
    n_labeled = 32                                         # --labelnum 1: the first 32 slices (patient 1)
    dataset = TrainSet("acdc", root, names, n_labeled, args.patch_size)
    torch.manual_seed(args.seed)                           # rank 0's seed; DDP broadcasts its initial weights
    model = build_model("acdc", args.drop_weak, args.drop_strong, args.dropout_type, args.pert_out_dropout).train()
    optimizer = training.make_optimizer(model, args)
    gaps = []
    for it in range(args.max_iterations):
        grads, buffers = [], None
        for rank in (0, 1):
            assert args.cutmix_partner == "second_batch"     # the default: a partner batch of unlabeled_bs
            sampler = TwoStreamBatchSampler(range(n_labeled), range(n_labeled, len(dataset)), 2, 2, args.seed,
                                            args.max_iterations, 0, rank, 2, partner_bs=2)
            batch = collate_two_stream([dataset[item] for item in sampler.batch(it)])
            local = copy.deepcopy(model)
            monkeypatch.setattr(training, "rank", lambda r=rank: r)   # iteration_seed(seed, it) of that rank
            train_acdc.train_iteration(local, torch.optim.SGD(local.parameters(), lr=0.0), batch, it, args,
                                       torch.device("cpu"))
            grads.append([p.grad for p in local.parameters()])
            if rank == 0:
                buffers = {k: v.clone() for k, v in local.named_buffers()}
        monkeypatch.undo()
        gaps.append(max((g0 - g1).abs().max().item() for g0, g1 in zip(*grads)))
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = g0 / 2 + g1 / 2                       # DDP divides by the world size, then sums
        for group in optimizer.param_groups:
            group["lr"] = training.poly_lr(args, it)
        optimizer.step()
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    return model, optimizer, gaps


def test_two_gloo_processes_train_as_one_with_the_mean_gradient(ddp_run, monkeypatch):
    res, run_dir, root = ddp_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # rank 0 alone writes: one checkpoint pair, one tensorboard file, the log header once
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["iter_2.pth", "latest.pth"]
    assert not list(run_dir.glob("*.tmp")) and len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    log = (run_dir / "log.txt").read_text()
    assert log.count("ACDC crossmatch:") == 1 and "2+2 per batch x 2 process(es)" in log
    assert log.count("done: 2 iterations") == 1
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["args"]["batch_size"] * cfg["world_size"] == 8
    assert (cfg["n_labeled_slices"], cfg["n_unlabeled_slices"]) == (32, 32)
    final, latest = load_checkpoint(run_dir / "iter_2.pth"), load_checkpoint(run_dir / "latest.pth")
    assert final["world_size"] == latest["world_size"] == 2 and final["iteration"] == latest["iteration"] == 2
    assert all(torch.equal(final["model"][k], latest["model"][k]) for k in final["model"])

    before = torch.get_num_threads()
    torch.set_num_threads(1)                               # as the processes ran (OMP_NUM_THREADS=1)
    try:
        model, optimizer, gaps = replay_two_ranks(root, monkeypatch)
    finally:
        torch.set_num_threads(before)
    assert min(gaps) > 1e-3                                # the two ranks' gradients really differ
    replay = model.state_dict()
    assert final["model"].keys() == replay.keys()
    worst = {k: (final["model"][k].double() - v.double()).abs().max().item() for k, v in replay.items()}
    assert max(worst.values()) <= 1e-6, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    assert any(k.endswith("running_mean") for k in replay)
    saved_state, replay_state = final["optimizer"]["state"], optimizer.state_dict()["state"]
    assert saved_state.keys() == replay_state.keys() and len(saved_state) == len(list(model.parameters()))
    for i in saved_state:
        for k, v in saved_state[i].items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.allclose(v, replay_state[i][k], rtol=0, atol=1e-6), (i, k)


def test_ranks_draw_disjoint_parts_of_each_batch():
    def batch(rank, it, kinds):
        s = TwoStreamBatchSampler(range(32), range(32, 64), 2, 2, seed=1337, num_iterations=4, rank=rank,
                                  world_size=2, partner_bs=2)
        return [i for i, _, k in s.batch(it) if k in kinds]
    for it in range(4):
        assert not set(batch(0, it, "lu")) & set(batch(1, it, "lu"))
        assert not set(batch(0, it, "p")) & set(batch(1, it, "p"))      # the CutMix partners too
        assert len(batch(0, it, "p")) == len(batch(1, it, "p")) == 2


def test_sync_bn_on_cpu_processes_is_refused(monkeypatch):
    import train_acdc
    monkeypatch.setattr(training, "init_distributed", lambda use_cuda, timeout_s: (0, 2, 0))
    args = train_acdc.parse_args(["--device", "cpu", "--sync_bn"])
    with pytest.raises(SystemExit, match="--sync_bn: SyncBatchNorm needs CUDA devices"):
        training.setup(args)


def _grad_worker(rank, port, out_dir):
    """One rank: the real train_acdc.train_iteration (two model calls, one backward; with --cutmix_partner
    second_batch, the default, first a no-grad eval-mode call on the partners) on a DDP model and on a plain
    local copy, for both CutMix partners; the DDP gradient must be the mean over ranks of the local gradients."""
    import train_acdc
    from networks import build_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for partner in ("second_batch", "batch"):
        args = train_acdc.parse_args(["--patch_size", "32", "32", "--batch_size", "4", "--labeled_bs", "2",
                                      "--max_iterations", "10", "--device", "cpu", "--conf_thresh", "0.3",
                                      "--cutmix_partner", partner])
        torch.manual_seed(0)
        base = build_model("acdc")
        local, ddp = copy.deepcopy(base), torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own samples
        batch = {k: torch.randn(2, 1, 32, 32, generator=g) for k in ("x_l", "x_w", "x_s1", "x_s2")}
        batch["y_l"] = torch.randint(0, 4, (2, 32, 32), generator=g)
        if partner == "second_batch":
            batch.update({k: torch.randn(2, 1, 32, 32, generator=g) for k in ("x_w_p", "x_s1_p", "x_s2_p")})
        for model in (local, ddp):
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            train_acdc.train_iteration(model, opt, batch, 3, args, torch.device("cpu"))
        worst = 0.0
        for p_local, p_ddp in zip(local.parameters(), ddp.module.parameters()):
            mean = p_local.grad.clone()
            dist.all_reduce(mean)
            mean /= 2
            worst = max(worst, (mean - p_ddp.grad).abs().max().item())
        same = torch.cat([p.detach().flatten() for p in ddp.module.parameters()])
        ref = same.clone()
        dist.broadcast(ref, 0)
        results[partner] = {"worst": worst, "in_sync": bool(torch.equal(ref, same)),
                            "training": ddp.training and ddp.module.training and local.training}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()  # both ranks done before the teardown: gloo aborts a rank whose peer left first (seen once in CI)
    dist.destroy_process_group()


def test_ddp_gradient_of_the_two_pass_iteration_is_the_mean_of_local_gradients(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_grad_worker, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results.keys() == {"second_batch", "batch"}
        for res in results.values():
            assert res["worst"] == 0.0 and res["in_sync"] and res["training"], results
