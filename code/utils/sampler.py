"""The two-stream batch sampler and its collate function.

Iteration ``it`` on rank ``rank`` (of ``world``) yields ``labeled_bs`` labeled, ``unlabeled_bs`` unlabeled and
``partner_bs`` CutMix-partner ``(dataset index, aug_seed, kind)`` triples (kind 'l', 'u', 'p'), a pure function
of ``(seed, it, rank)``: each stream (0 labeled, 1 unlabeled, 2 partners: the unlabeled indices again, drawn
independently) walks through epochs of seeded permutations (epoch ``e`` of stream ``s`` is
``default_rng([seed, s, e]).permutation(n)``), and sample ``j`` of the batch sits at stream position
``(it * world + rank) * bs + j``, so the ranks draw disjoint consecutive parts of one sequence. ``aug_seed``
comes from ``SeedSequence([seed, it, rank, slot, tag])``. Resuming at ``start_iteration=k`` therefore gives
exactly the batches an uninterrupted run would have had.
"""
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Sampler

AUG_TAG = 0xA06_5EED


class TwoStreamBatchSampler(Sampler):
    def __init__(self, labeled_idxs, unlabeled_idxs, labeled_bs: int, unlabeled_bs: int, seed: int,
                 num_iterations: int, start_iteration: int = 0, rank: int = 0, world_size: int = 1,
                 partner_bs: int = 0):
        unlabeled = np.asarray(list(unlabeled_idxs), dtype=np.int64)
        self.streams = [(np.asarray(list(labeled_idxs), dtype=np.int64), labeled_bs), (unlabeled, unlabeled_bs),
                        (unlabeled, partner_bs)]
        for idxs, bs in self.streams:
            if bs > 0 and len(idxs) == 0:
                raise ValueError(f"a stream with batch size {bs} has no samples")
        self.seed, self.num_iterations, self.start_iteration = seed, num_iterations, start_iteration
        self.rank, self.world_size = rank, world_size

    @lru_cache(maxsize=8)
    def permutation(self, stream: int, epoch: int) -> np.ndarray:
        idxs = self.streams[stream][0]
        return idxs[np.random.default_rng([self.seed, stream, epoch]).permutation(len(idxs))]

    def batch(self, it: int) -> list:
        """The ``(index, aug_seed, kind)`` triples of iteration ``it`` on this rank."""
        out = []
        for stream, (idxs, bs), kind in zip(range(3), self.streams, "lup"):
            start = (it * self.world_size + self.rank) * bs
            for p in range(start, start + bs):
                index = int(self.permutation(stream, p // len(idxs))[p % len(idxs)])
                state = np.random.SeedSequence([self.seed, it, self.rank, len(out), AUG_TAG]).generate_state(1, np.uint64)
                out.append((index, int(state[0] >> np.uint64(1)), kind))
        return out

    def __iter__(self):
        for it in range(self.start_iteration, self.num_iterations):
            yield self.batch(it)

    def __len__(self):
        return self.num_iterations - self.start_iteration


def collate_two_stream(samples: list) -> dict:
    """``x_l (L, 1, *S)``, ``y_l (L, *S)`` int64, ``x_w``, ``x_s1``, ``x_s2`` ``(U, 1, *S)``, the partners'
    ``x_w_p``, ``x_s1_p``, ``x_s2_p`` and the dataset indices ``idx_l``, ``idx_u``, ``idx_p``. An empty stream
    gives empty tensors of the right shape."""
    lab, unl, par = ([s for s in samples if s["kind"] == k] for k in "lup")
    shape = (lab[0]["image"] if lab else samples[0]["image_w"]).shape[1:]

    def stack(items, key, lead=(0, 1)):
        return torch.stack([s[key] for s in items]) if items else torch.zeros(lead + tuple(shape))
    return {"x_l": stack(lab, "image"), "y_l": stack(lab, "label", (0,)).long(),
            "x_w": stack(unl, "image_w"), "x_s1": stack(unl, "image_s1"), "x_s2": stack(unl, "image_s2"),
            "x_w_p": stack(par, "image_w"), "x_s1_p": stack(par, "image_s1"), "x_s2_p": stack(par, "image_s2"),
            **{f"idx_{k}": torch.tensor([s["index"] for s in items], dtype=torch.int64)
               for k, items in zip("lup", (lab, unl, par))}}
