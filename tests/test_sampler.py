"""utils/sampler.py: the two-stream batches of (index, aug_seed, kind) triples (composition, epochs, the CutMix
partner stream, resume, ranks) and their collate function."""
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
    return [idx for b in batches for idx, _, _ in b[lo:hi]]


def pairs(batch):
    """A batch without the kinds: the (index, aug_seed) pairs of the two-stream sampler before partners."""
    return [(i, s) for i, s, _ in batch]


def test_batch_composition():
    batches = list(make())
    assert len(batches) == 40
    for b in batches:
        assert len(b) == 5 and [k for _, _, k in b] == ["l", "l", "u", "u", "u"]   # no partners by default
        assert all(i in LAB for i, _, _ in b[:2])
        assert all(i in UNL for i, _, _ in b[2:])
        assert all(isinstance(i, int) and isinstance(s, int) and s >= 0 for i, s, _ in b)
        assert len({s for _, s, _ in b}) == 5  # distinct aug seeds within a batch
    for b in make(partner_bs=4):
        assert len(b) == 9 and [k for _, _, k in b] == ["l"] * 2 + ["u"] * 3 + ["p"] * 4
        assert all(i in LAB for i, _, _ in b[:2]) and all(i in UNL for i, _, _ in b[2:])
        assert all(isinstance(i, int) and isinstance(s, int) and s >= 0 for i, s, _ in b)
        assert len({s for _, s, _ in b}) == 9  # the partner slots have their own aug seeds


def test_partners_leave_the_labeled_and_unlabeled_triples_unchanged():
    """The l/u triples are the same with or without partners (same indices, same aug seeds); the partner slots
    continue the slot numbering after the unlabeled ones."""
    plain, with_p = make(), make(partner_bs=3)
    for it in range(40):
        assert with_p.batch(it)[:5] == plain.batch(it)
    for it in (0, 17):
        for slot, (_, sd, kind) in enumerate(with_p.batch(it)):
            state = np.random.SeedSequence([1337, it, 0, slot, AUG_TAG]).generate_state(1, np.uint64)[0]
            assert sd == int(state) >> 1, (it, slot, kind)


def test_each_epoch_visits_every_index_once():
    batches = list(make(partner_bs=3))
    lab = stream(batches, 0, 2)      # 80 positions = 8 labeled epochs
    unl = stream(batches, 2, 5)      # 120 positions = 6 unlabeled epochs
    par = stream(batches, 5, 8)      # 120 positions = 6 partner epochs
    for seq, idxs in ((lab, LAB), (unl, UNL), (par, UNL)):
        n = len(idxs)
        epochs = [seq[i:i + n] for i in range(0, len(seq), n)]
        assert all(sorted(e) == idxs for e in epochs)
        assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_partner_stream_is_independent_of_the_unlabeled_stream():
    batches = list(make(partner_bs=3))
    unl, par = stream(batches, 2, 5), stream(batches, 5, 8)
    assert par != unl                                       # drawn from its own permutations (stream 2) ...
    same_slot = sum(u == p for u, p in zip(unl, par))
    assert same_slot < len(unl) // 4                        # ... not a shifted or aligned copy (about 1/20 match)
    for e in range(6):                                      # epoch e of the partners: default_rng([seed, 2, e])
        perm = np.random.default_rng([1337, 2, e]).permutation(len(UNL))
        assert par[e * 20:(e + 1) * 20] == [UNL[k] for k in perm]
    # the partner indices depend on the partner batch size only: not on the other streams' batch sizes
    other = list(make(partner_bs=3, labeled_bs=1, unlabeled_bs=5))
    assert [i for b in other for i, _, k in b if k == "p"] == par
    # and the unlabeled stream does not depend on the partner batch size
    assert stream(list(make(partner_bs=7)), 2, 5) == unl


def test_resume_and_determinism():
    for partner_bs in (0, 3):
        full = list(make(partner_bs=partner_bs))
        for k in (0, 1, 7, 39, 40):
            assert list(make(start_iteration=k, partner_bs=partner_bs)) == full[k:]
        assert len(make(start_iteration=7, partner_bs=partner_bs)) == 33
        assert list(make(partner_bs=partner_bs)) == full
        s = make(partner_bs=partner_bs)
        assert s.batch(12) == full[12] and s.batch(3) == full[3]   # random access, any order
        assert list(make(seed=1, partner_bs=partner_bs)) != full
    # the partner stream alone changes with the seed too
    assert stream(list(make(seed=1, partner_bs=3)), 5, 8) != stream(list(make(partner_bs=3)), 5, 8)


def test_ranks_are_disjoint_within_an_epoch():
    lab = list(range(12))
    unl = list(range(100, 124))
    kw = dict(labeled_idxs=lab, unlabeled_idxs=unl, labeled_bs=2, unlabeled_bs=4, seed=3, num_iterations=3,
              world_size=2, partner_bs=4)
    r0 = list(TwoStreamBatchSampler(rank=0, **kw))
    r1 = list(TwoStreamBatchSampler(rank=1, **kw))
    # 3 iterations x 2 ranks x 2 = 12 labeled = one epoch; x 4 = 24 unlabeled = one epoch, 24 partners too
    assert sorted(stream(r0, 0, 2) + stream(r1, 0, 2)) == lab
    assert sorted(stream(r0, 2, 6) + stream(r1, 2, 6)) == unl
    assert sorted(stream(r0, 6, 10) + stream(r1, 6, 10)) == unl
    assert not set(stream(r0, 0, 6)) & set(stream(r1, 0, 6))
    assert not set(stream(r0, 6, 10)) & set(stream(r1, 6, 10))   # the partner stream is split between the ranks
    seeds0 = {s for b in r0 for _, s, _ in b}
    seeds1 = {s for b in r1 for _, s, _ in b}
    assert not seeds0 & seeds1
    # rank 0 of world size 2 reads the same global sequence as world size 1, interleaved
    single = list(TwoStreamBatchSampler(lab, unl, 2, 4, seed=3, num_iterations=6, partner_bs=4))
    assert stream(single, 0, 2)[:4] == stream(r0, 0, 2)[:2] + stream(r1, 0, 2)[:2]
    assert stream(single, 6, 10)[:8] == stream(r0, 6, 10)[:4] + stream(r1, 6, 10)[:4]


def test_batch_larger_than_stream_wraps_epochs():
    s = TwoStreamBatchSampler([5], [7, 8], 3, 1, seed=0, num_iterations=2)
    assert [i for i, _, _ in s.batch(0)] == [5, 5, 5, s.batch(0)[3][0]]
    s = TwoStreamBatchSampler([5], [7, 8], 1, 1, seed=0, num_iterations=2, partner_bs=5)
    par = [i for i, _, k in s.batch(0) if k == "p"]
    assert len(par) == 5 and sorted(par[:2]) == sorted(par[2:4]) == [7, 8] and par[4] in (7, 8)


def test_one_stream_only():
    s = TwoStreamBatchSampler(LAB, [], 4, 0, seed=0, num_iterations=5)
    assert all(len(b) == 4 and all(i in LAB and k == "l" for i, _, k in b) for b in s)
    s = TwoStreamBatchSampler([], UNL, 0, 2, seed=0, num_iterations=5)
    assert all(len(b) == 2 and all(k == "u" for _, _, k in b) for b in s)
    s = TwoStreamBatchSampler([], UNL, 0, 0, seed=0, num_iterations=5, partner_bs=2)
    assert all(len(b) == 2 and all(i in UNL and k == "p" for i, _, k in b) for b in s)


def test_a_stream_with_a_batch_size_needs_samples():
    with pytest.raises(ValueError, match="no samples"):
        make(labeled_idxs=[])
    with pytest.raises(ValueError, match="no samples"):
        make(unlabeled_idxs=[])
    with pytest.raises(ValueError, match="no samples"):   # partners are drawn from the unlabeled indices
        make(unlabeled_idxs=[], unlabeled_bs=0, partner_bs=2)
    assert len(make(unlabeled_idxs=[], unlabeled_bs=0, partner_bs=0).batch(0)) == 2


def test_batches_follow_the_documented_formula():
    """Sample j of stream s (0 labeled, 1 unlabeled, 2 partners drawn from the unlabeled indices) at iteration
    it on rank r sits at position p = (it * world + r) * bs + j of the stream's sequence of epochs (epoch e =
    default_rng([seed, s, e]).permutation(n)); its augmentation seed is SeedSequence([seed, it, r, slot,
    AUG_TAG]) shifted to 63 bits, the slots numbered across the three streams."""
    lab, unl = [3, 1, 4], [10, 15, 19, 12, 17]
    seed, world = 99, 3
    for rank in range(world):
        s = TwoStreamBatchSampler(lab, unl, 2, 4, seed=seed, num_iterations=6, rank=rank, world_size=world,
                                  partner_bs=3)
        for it in (0, 1, 5):
            expected = []
            for stream_id, (idxs, bs, kind) in enumerate(((lab, 2, "l"), (unl, 4, "u"), (unl, 3, "p"))):
                for j in range(bs):
                    p = (it * world + rank) * bs + j
                    perm = np.random.default_rng([seed, stream_id, p // len(idxs)]).permutation(len(idxs))
                    slot = len(expected)
                    state = np.random.SeedSequence([seed, it, rank, slot, AUG_TAG]).generate_state(1, np.uint64)[0]
                    expected.append((idxs[perm[p % len(idxs)]], int(state) >> 1, kind))
            assert s.batch(it) == expected, (rank, it)


def test_aug_seeds_are_pure_and_distinct():
    s = make(num_iterations=5, world_size=2, partner_bs=3)
    t = make(num_iterations=5, world_size=2, rank=1, partner_bs=3)
    seeds = [sd for smp in (s, t) for it in range(5) for _, sd, _ in smp.batch(it)]
    assert len(set(seeds)) == len(seeds) == 80                 # per iteration, rank and slot
    assert all(0 <= sd < 2 ** 63 for sd in seeds)
    assert [sd for _, sd, _ in make(num_iterations=5, world_size=2, partner_bs=3).batch(3)] == [
        sd for _, sd, _ in s.batch(3)]


def sample(kind, index, shape):
    x = torch.full((1, *shape), float(index))
    if kind == "l":
        return {"kind": "l", "index": index, "image": x, "label": torch.full(shape, index % 4, dtype=torch.int64)}
    return {"kind": kind, "index": index, "image_w": x, "image_s1": x + 0.5, "image_s2": x + 0.25}


KEYS = {"x_l", "y_l", "x_w", "x_s1", "x_s2", "x_w_p", "x_s1_p", "x_s2_p", "idx_l", "idx_u", "idx_p"}


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 2)])
def test_collate_two_stream(shape):
    b = collate_two_stream([sample("l", 1, shape), sample("u", 7, shape), sample("l", 2, shape),
                            sample("u", 9, shape), sample("u", 8, shape)])
    assert b.keys() == KEYS
    assert b["x_l"].shape == (2, 1, *shape) and b["y_l"].shape == (2, *shape) and b["y_l"].dtype == torch.int64
    for k in ("x_w", "x_s1", "x_s2"):
        assert b[k].shape == (3, 1, *shape) and b[k].dtype == torch.float32
    assert b["idx_l"].tolist() == [1, 2] and b["idx_u"].tolist() == [7, 9, 8]
    assert b["x_l"].flatten(1)[:, 0].tolist() == [1, 2] and b["x_s1"].flatten(1)[:, 0].tolist() == [7.5, 9.5, 8.5]
    assert b["y_l"][1].unique().tolist() == [2] and b["x_s2"][2].unique().tolist() == [8.25]
    # no partner samples: empty partner tensors of the right shape
    for k in ("x_w_p", "x_s1_p", "x_s2_p"):
        assert b[k].shape == (0, 1, *shape) and b[k].dtype == torch.float32
    assert b["idx_p"].shape == (0,) and b["idx_p"].dtype == torch.int64
    # one stream empty (supervised training; a purely unlabeled batch): empty tensors of the right shape
    sup = collate_two_stream([sample("l", 0, shape), sample("l", 3, shape)])
    assert sup["x_w"].shape == sup["x_s2"].shape == (0, 1, *shape) and sup["idx_u"].shape == (0,)
    assert sup["x_w_p"].shape == sup["x_s2_p"].shape == (0, 1, *shape) and sup["idx_p"].shape == (0,)
    assert torch.cat([sup["x_l"], sup["x_w"]]).shape == (2, 1, *shape)
    uns = collate_two_stream([sample("u", 5, shape)])
    assert uns["x_l"].shape == (0, 1, *shape) and uns["y_l"].shape == (0, *shape) and uns["y_l"].dtype == torch.int64


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 2)])
def test_collate_two_stream_partners(shape):
    """The 'p' samples go to x_w_p, x_s1_p, x_s2_p and idx_p, in their order, apart from the 'u' samples (the
    same dataset index may be in both)."""
    b = collate_two_stream([sample("l", 1, shape), sample("u", 7, shape), sample("u", 9, shape),
                            sample("p", 9, shape), sample("p", 3, shape)])
    assert b.keys() == KEYS
    assert b["idx_l"].tolist() == [1] and b["idx_u"].tolist() == [7, 9] and b["idx_p"].tolist() == [9, 3]
    assert b["idx_p"].dtype == torch.int64
    for k in ("x_w_p", "x_s1_p", "x_s2_p"):
        assert b[k].shape == (2, 1, *shape) and b[k].dtype == torch.float32
    assert b["x_w_p"].flatten(1)[:, 0].tolist() == [9, 3] and b["x_s1_p"].flatten(1)[:, 0].tolist() == [9.5, 3.5]
    assert b["x_s2_p"][1].unique().tolist() == [3.25]
    assert b["x_w"].shape == (2, 1, *shape) and b["x_w"].flatten(1)[:, 0].tolist() == [7, 9]
    # interleaved kinds are sorted into their streams
    mixed = collate_two_stream([sample("p", 4, shape), sample("u", 6, shape), sample("p", 5, shape)])
    assert mixed["idx_p"].tolist() == [4, 5] and mixed["idx_u"].tolist() == [6]
    assert mixed["x_l"].shape == (0, 1, *shape) and mixed["x_s2_p"].flatten(1)[:, 0].tolist() == [4.25, 5.25]
    # the sampler's batch, collated: partner slots follow the unlabeled ones, as many as partner_bs
    s = TwoStreamBatchSampler(LAB, UNL, 2, 3, seed=0, num_iterations=1, partner_bs=3)
    items = s.batch(0)
    c = collate_two_stream([sample(k, i, shape) for i, _, k in items])
    assert c["idx_p"].tolist() == [i for i, _, k in items if k == "p"] and c["x_w_p"].shape[0] == 3
    assert c["idx_u"].tolist() == [i for i, _, k in items if k == "u"]


class Echo(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, item):
        return item


def test_as_dataloader_batch_sampler():
    """A DataLoader hands the dataset exactly the sampler's triples, in order."""
    for partner_bs in (0, 2):
        s = make(num_iterations=4, partner_bs=partner_bs)
        out = list(DataLoader(Echo(), batch_sampler=s, collate_fn=list))
        assert out == list(make(num_iterations=4, partner_bs=partner_bs))
        assert all(isinstance(t, tuple) and len(t) == 3 for b in out for t in b)
