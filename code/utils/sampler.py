"""Two-stream batch sampler and the matching collate function.

Every iteration ``it`` yields one batch: ``labeled_bs`` labeled then ``unlabeled_bs`` unlabeled
``(dataset_index, aug_seed)`` pairs. The batch is a pure function of ``(seed, it, rank)``:

* each stream walks through epochs of seeded permutations of its indices. Sample ``j`` of the batch
  of iteration ``it`` on rank ``rank`` sits at stream position ``p = (it * world_size + rank) * bs + j``,
  which lies in epoch ``p // n`` (``n`` = stream length) at offset ``p % n``; the permutation of epoch ``e``
  is ``numpy.random.default_rng([seed, stream_id, e]).permutation(n)`` (stream_id 0 labeled, 1 unlabeled).
  With ``world_size`` W the ranks therefore draw disjoint consecutive slices of one global sequence: the
  per-rank batch is ``labeled_bs + unlabeled_bs``, the effective batch W times that, and within an epoch
  no index is drawn twice across ranks.
* ``aug_seed`` comes from ``numpy.random.SeedSequence([seed, it, rank, slot, _AUG_TAG])`` (``slot`` = the
  position in the batch list), so the dataset's random choices do not depend on worker count or history.

Resuming at ``start_iteration=k`` gives exactly the batches iterations ``k, k+1, ...`` would have had.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

# domain tag so that aug seeds never coincide with other uses of SeedSequence([seed, it, rank, ...])
_AUG_TAG = 0xA06_5EED
_STREAM_LABELED = 0
_STREAM_UNLABELED = 1


def _as_index_array(idxs, name: str) -> np.ndarray:
    try:
        arr = np.asarray(list(idxs))
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of ints, got {type(idxs).__name__}") from exc
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be a flat sequence of ints, got dtype {arr.dtype} shape {arr.shape}")
    if arr.min() < 0:
        raise ValueError(f"{name} contains negative indices (min {arr.min()})")
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"{name} contains duplicate indices")
    return arr.astype(np.int64)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class _Stream:
    """One index stream: epochs of seeded permutations, read at absolute positions."""

    def __init__(self, idxs: np.ndarray, seed: int, stream_id: int, cache_size: int = 4):
        self.idxs = idxs
        self.seed = seed
        self.stream_id = stream_id
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            rng = np.random.default_rng([self.seed, self.stream_id, epoch])
            perm = self.idxs[rng.permutation(len(self.idxs))]
            self._perms[epoch] = perm
            while len(self._perms) > self._cache_size:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(epoch)
        return perm

    def take(self, start: int, count: int) -> list[int]:
        n = len(self.idxs)
        out = []
        for p in range(start, start + count):
            out.append(int(self.permutation(p // n)[p % n]))
        return out


def aug_seed(seed: int, it: int, rank: int, slot: int) -> int:
    """The augmentation seed of one batch slot (a non-negative int below 2**63)."""
    state = np.random.SeedSequence([seed, it, rank, slot, _AUG_TAG]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


class TwoStreamBatchSampler(Sampler):
    """Yields per iteration ``[(index, aug_seed)] * labeled_bs + [(index, aug_seed)] * unlabeled_bs``.

    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_two_stream)``.
    ``labeled_bs`` / ``unlabeled_bs`` are per-rank batch sizes; a batch size may exceed the length of its
    stream (epochs wrap, so an index can then appear twice in one batch); a stream with batch size 0 may
    be empty (e.g. supervised training on the labeled stream only).
    """

    def __init__(self, labeled_idxs: Sequence[int], unlabeled_idxs: Sequence[int], labeled_bs: int,
                 unlabeled_bs: int, seed: int, num_iterations: int, start_iteration: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.labeled_bs = _check_int(labeled_bs, "labeled_bs", 0)
        self.unlabeled_bs = _check_int(unlabeled_bs, "unlabeled_bs", 0)
        if self.labeled_bs + self.unlabeled_bs == 0:
            raise ValueError("labeled_bs + unlabeled_bs must be > 0 (both are 0)")
        self.seed = _check_int(seed, "seed", 0)
        self.num_iterations = _check_int(num_iterations, "num_iterations", 0)
        self.start_iteration = _check_int(start_iteration, "start_iteration", 0)
        if self.start_iteration > self.num_iterations:
            raise ValueError(f"start_iteration {self.start_iteration} is beyond num_iterations "
                             f"{self.num_iterations}")
        self.world_size = _check_int(world_size, "world_size", 1)
        self.rank = _check_int(rank, "rank", 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} must be < world_size {self.world_size}")
        lab = _as_index_array(labeled_idxs, "labeled_idxs")
        unl = _as_index_array(unlabeled_idxs, "unlabeled_idxs")
        if self.labeled_bs > 0 and len(lab) == 0:
            raise ValueError(f"labeled_bs is {self.labeled_bs} but labeled_idxs is empty")
        if self.unlabeled_bs > 0 and len(unl) == 0:
            raise ValueError(f"unlabeled_bs is {self.unlabeled_bs} but unlabeled_idxs is empty")
        common = np.intersect1d(lab, unl)
        if len(common):
            raise ValueError(f"labeled_idxs and unlabeled_idxs overlap ({len(common)} indices, e.g. {common[0]})")
        self.labeled_idxs = lab
        self.unlabeled_idxs = unl
        self._streams = [(_Stream(lab, self.seed, _STREAM_LABELED), self.labeled_bs),
                         (_Stream(unl, self.seed, _STREAM_UNLABELED), self.unlabeled_bs)]

    def batch(self, it: int) -> list[tuple[int, int]]:
        """The batch of iteration ``it`` on this rank (a pure function of seed, it, rank)."""
        it = _check_int(it, "it", 0)
        out: list[tuple[int, int]] = []
        for stream, bs in self._streams:
            if bs == 0:
                continue
            start = (it * self.world_size + self.rank) * bs
            for idx in stream.take(start, bs):
                out.append((idx, aug_seed(self.seed, it, self.rank, len(out))))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for it in range(self.start_iteration, self.num_iterations):
            yield self.batch(it)

    def __len__(self) -> int:
        return self.num_iterations - self.start_iteration


def _spatial_shape(sample: dict) -> tuple[int, ...]:
    key = "image" if sample["kind"] == "l" else "image_w"
    return tuple(sample[key].shape[1:])


def collate_two_stream(samples: list[dict]) -> dict:
    """Stack dataset samples (``kind`` 'l' or 'u') into the training batch dict.

    Returns ``x_l (L,1,*S) float32, y_l (L,*S) int64, x_w, x_s1, x_s2 (U,1,*S) float32,
    idx_l (L,) int64, idx_u (U,) int64``. A stream without samples gives empty tensors with the spatial
    shape of the other stream (so ``torch.cat`` with them works).
    """
    if not samples:
        raise ValueError("collate_two_stream got an empty batch")
    lab = [s for s in samples if s["kind"] == "l"]
    unl = [s for s in samples if s["kind"] == "u"]
    if len(lab) + len(unl) != len(samples):
        kinds = sorted({str(s.get("kind")) for s in samples})
        raise ValueError(f"collate_two_stream: sample kinds must be 'l' or 'u', got {kinds}")
    shape = _spatial_shape(samples[0])

    def stack(items, key, dtype):
        if items:
            return torch.stack([torch.as_tensor(s[key]) for s in items]).to(dtype)
        lead = (0, 1) if key != "label" else (0,)
        return torch.zeros(lead + shape, dtype=dtype)

    return {
        "x_l": stack(lab, "image", torch.float32),
        "y_l": stack(lab, "label", torch.int64),
        "x_w": stack(unl, "image_w", torch.float32),
        "x_s1": stack(unl, "image_s1", torch.float32),
        "x_s2": stack(unl, "image_s2", torch.float32),
        "idx_l": torch.tensor([int(s["index"]) for s in lab], dtype=torch.int64),
        "idx_u": torch.tensor([int(s["index"]) for s in unl], dtype=torch.int64),
    }
