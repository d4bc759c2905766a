"""utils/sampler.py: the two-stream batches (composition, epochs, resume, ranks) and their collate function."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from utils.sampler import AUG_TAG, TwoStreamBatchSampler, collate_two_stream

LAB = list(range(10))
UNL = list(range(10, 30))


def make(**kw):
    args = dict(labeled_idxs=LAB, unlabeled_idxs=UNL, labeled_bs=2, unlabeled_bs=3, seed=1337,
                num_iterations=40)
    args.update(kw)
    return TwoStreamBatchSampler(**args)


def stream(batches, lo, hi):
    return [idx for b in batches for idx, _ in b[lo:hi]]


def test_batch_composition():
    batches = list(make())
    assert len(batches) == 40
    for b in batches:
        assert len(b) == 5
        assert all(i in LAB for i, _ in b[:2])
        assert all(i in UNL for i, _ in b[2:])
        assert all(isinstance(i, int) and isinstance(s, int) and s >= 0 for i, s in b)
        assert len({s for _, s in b}) == 5  # distinct aug seeds within a batch


def test_each_epoch_visits_every_index_once():
    batches = list(make())
    lab = stream(batches, 0, 2)      # 80 positions = 8 labeled epochs
    unl = stream(batches, 2, 5)      # 120 positions = 6 unlabeled epochs
    for seq, idxs in ((lab, LAB), (unl, UNL)):
        n = len(idxs)
        epochs = [seq[i:i + n] for i in range(0, len(seq), n)]
        assert all(sorted(e) == idxs for e in epochs)
        assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_resume_and_determinism():
    full = list(make())
    for k in (0, 1, 7, 39, 40):
        assert list(make(start_iteration=k)) == full[k:]
    assert len(make(start_iteration=7)) == 33
    assert list(make()) == full
    s = make()
    assert s.batch(12) == full[12] and s.batch(3) == full[3]   # random access, any order
    assert list(make(seed=1)) != full


def test_ranks_are_disjoint_within_an_epoch():
    lab = list(range(12))
    unl = list(range(100, 124))
    kw = dict(labeled_idxs=lab, unlabeled_idxs=unl, labeled_bs=2, unlabeled_bs=4, seed=3, num_iterations=3,
              world_size=2)
    r0 = list(TwoStreamBatchSampler(rank=0, **kw))
    r1 = list(TwoStreamBatchSampler(rank=1, **kw))
    # 3 iterations x 2 ranks x 2 = 12 labeled = one epoch; x 4 = 24 unlabeled = one epoch
    assert sorted(stream(r0, 0, 2) + stream(r1, 0, 2)) == lab
    assert sorted(stream(r0, 2, 6) + stream(r1, 2, 6)) == unl
    assert not set(stream(r0, 0, 6)) & set(stream(r1, 0, 6))
    seeds0 = {s for b in r0 for _, s in b}
    seeds1 = {s for b in r1 for _, s in b}
    assert not seeds0 & seeds1
    # rank 0 of world size 2 reads the same global sequence as world size 1, interleaved
    single = list(TwoStreamBatchSampler(lab, unl, 2, 4, seed=3, num_iterations=6))
    assert stream(single, 0, 2)[:4] == stream(r0, 0, 2)[:2] + stream(r1, 0, 2)[:2]


def test_batch_larger_than_stream_wraps_epochs():
    s = TwoStreamBatchSampler([5], [7, 8], 3, 1, seed=0, num_iterations=2)
    assert [i for i, _ in s.batch(0)] == [5, 5, 5, s.batch(0)[3][0]]


def test_one_stream_only():
    s = TwoStreamBatchSampler(LAB, [], 4, 0, seed=0, num_iterations=5)
    assert all(len(b) == 4 and all(i in LAB for i, _ in b) for b in s)
    s = TwoStreamBatchSampler([], UNL, 0, 2, seed=0, num_iterations=5)
    assert all(len(b) == 2 for b in s)


def test_a_stream_with_a_batch_size_needs_samples():
    with pytest.raises(ValueError, match="no samples"):
        make(labeled_idxs=[])
    with pytest.raises(ValueError, match="no samples"):
        make(unlabeled_idxs=[])


def test_batches_follow_the_documented_formula():
    """Sample j of stream s at iteration it on rank r sits at position p = (it * world + r) * bs + j of the
    stream's sequence of epochs (epoch e = default_rng([seed, s, e]).permutation(n)); its augmentation seed is
    SeedSequence([seed, it, r, slot, AUG_TAG]) shifted to 63 bits."""
    lab, unl = [3, 1, 4], [10, 15, 19, 12, 17]
    seed, world = 99, 3
    for rank in range(world):
        s = TwoStreamBatchSampler(lab, unl, 2, 4, seed=seed, num_iterations=6, rank=rank, world_size=world)
        for it in (0, 1, 5):
            expected = []
            for stream, (idxs, bs) in enumerate(((lab, 2), (unl, 4))):
                for j in range(bs):
                    p = (it * world + rank) * bs + j
                    perm = np.random.default_rng([seed, stream, p // len(idxs)]).permutation(len(idxs))
                    slot = len(expected)
                    state = np.random.SeedSequence([seed, it, rank, slot, AUG_TAG]).generate_state(1, np.uint64)[0]
                    expected.append((idxs[perm[p % len(idxs)]], int(state) >> 1))
            assert s.batch(it) == expected, (rank, it)


def test_aug_seeds_are_pure_and_distinct():
    s = make(num_iterations=5, world_size=2)
    t = make(num_iterations=5, world_size=2, rank=1)
    seeds = [sd for smp in (s, t) for it in range(5) for _, sd in smp.batch(it)]
    assert len(set(seeds)) == len(seeds) == 50                 # per iteration, rank and slot
    assert all(0 <= sd < 2 ** 63 for sd in seeds)
    assert [sd for _, sd in make(num_iterations=5, world_size=2).batch(3)] == [sd for _, sd in s.batch(3)]


def sample(kind, index, shape):
    x = torch.full((1, *shape), float(index))
    if kind == "l":
        return {"kind": "l", "index": index, "image": x, "label": torch.full(shape, index % 4, dtype=torch.int64)}
    return {"kind": "u", "index": index, "image_w": x, "image_s1": x + 0.5, "image_s2": x + 0.25}


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 2)])
def test_collate_two_stream(shape):
    b = collate_two_stream([sample("l", 1, shape), sample("u", 7, shape), sample("l", 2, shape),
                            sample("u", 9, shape), sample("u", 8, shape)])
    assert b["x_l"].shape == (2, 1, *shape) and b["y_l"].shape == (2, *shape) and b["y_l"].dtype == torch.int64
    for k in ("x_w", "x_s1", "x_s2"):
        assert b[k].shape == (3, 1, *shape) and b[k].dtype == torch.float32
    assert b["idx_l"].tolist() == [1, 2] and b["idx_u"].tolist() == [7, 9, 8]
    assert b["x_l"].flatten(1)[:, 0].tolist() == [1, 2] and b["x_s1"].flatten(1)[:, 0].tolist() == [7.5, 9.5, 8.5]
    assert b["y_l"][1].unique().tolist() == [2] and b["x_s2"][2].unique().tolist() == [8.25]
    # one stream empty (supervised training; a purely unlabeled batch): empty tensors of the right shape
    sup = collate_two_stream([sample("l", 0, shape), sample("l", 3, shape)])
    assert sup["x_w"].shape == sup["x_s2"].shape == (0, 1, *shape) and sup["idx_u"].shape == (0,)
    assert torch.cat([sup["x_l"], sup["x_w"]]).shape == (2, 1, *shape)
    uns = collate_two_stream([sample("u", 5, shape)])
    assert uns["x_l"].shape == (0, 1, *shape) and uns["y_l"].shape == (0, *shape) and uns["y_l"].dtype == torch.int64


class Echo(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, item):
        return np.array(item)


def test_as_dataloader_batch_sampler():
    s = make(num_iterations=4)
    out = [b.tolist() for b in DataLoader(Echo(), batch_sampler=s)]
    assert out == [[list(p) for p in b] for b in make(num_iterations=4)]
