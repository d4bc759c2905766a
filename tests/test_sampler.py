import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from utils.sampler import TwoStreamBatchSampler, aug_seed

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


@pytest.mark.parametrize("kw, msg", [
    (dict(labeled_idxs=[]), "labeled_idxs is empty"),
    (dict(unlabeled_idxs=[]), "unlabeled_idxs is empty"),
    (dict(labeled_bs=0, unlabeled_bs=0), "must be > 0"),
    (dict(unlabeled_idxs=[9, 10, 11]), "overlap"),
    (dict(labeled_idxs=[1, 1, 2]), "duplicate"),
    (dict(rank=2, world_size=2), "rank"),
    (dict(start_iteration=41), "start_iteration"),
    (dict(labeled_bs=-1), "labeled_bs"),
    (dict(seed=-5), "seed"),
])
def test_argument_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        make(**kw)


def test_aug_seed_is_pure():
    assert aug_seed(1, 2, 0, 3) == aug_seed(1, 2, 0, 3)
    assert len({aug_seed(1, it, r, s) for it in range(5) for r in range(2) for s in range(4)}) == 40
    assert all(0 <= aug_seed(7, 3, 1, s) < 2 ** 63 for s in range(8))


class Echo(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, item):
        return np.array(item)


def test_as_dataloader_batch_sampler():
    s = make(num_iterations=4)
    out = [b.tolist() for b in DataLoader(Echo(), batch_sampler=s)]
    assert out == [[list(p) for p in b] for b in make(num_iterations=4)]
