"""Samplers that decide which images each rank reads in each epoch, for both pipelines (DALI's external source and
the torch DataLoader). Each is a pure function of (seed, epoch): `indices(epoch)`; `set_epoch` + `__iter__` make it a
torch Sampler too.

RASampler is DeiT's repeated augmentation (facebookresearch/deit samplers.py): every image of a shuffled order is
repeated `num_repeats` times, consecutive copies go to consecutive ranks (so the repeats of an image are augmented
differently on different GPUs), and each rank stops after floor(N // 256 * 256 / world_size) samples, so that an epoch
is as long as without repetition.
"""

from __future__ import annotations

import math

import torch


class _EpochSampler(torch.utils.data.Sampler):
    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        self.num_samples_total, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples_total)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples_total, generator=g)

    def indices(self, epoch: int) -> list[int]:
        raise NotImplementedError

    def __iter__(self):
        return iter(self.indices(self.epoch))

    def __len__(self) -> int:
        return len(self.indices(0))


class RASampler(_EpochSampler):
    """DeiT's RASampler: repeats, rank striding and epoch length as facebookresearch/deit computes them (its seed is
    the epoch; here seed + epoch). For datasets under 256 images, where DeiT's rounding would leave nothing, the
    epoch rounds down to a multiple of the world size instead."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 num_repeats: int = 3):
        super().__init__(num_samples, rank, world_size, seed, shuffle)
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.num_repeats = num_repeats
        self.per_rank = int(math.ceil(num_samples * num_repeats / world_size))
        self.total_size = self.per_rank * world_size
        selected = int(math.floor(num_samples // 256 * 256 / world_size))
        self.num_selected = selected if selected > 0 else num_samples // world_size

    def indices(self, epoch: int) -> list[int]:
        order = torch.repeat_interleave(self._order(epoch), repeats=self.num_repeats, dim=0).tolist()
        order += order[:self.total_size - len(order)]
        return order[self.rank:self.total_size:self.world_size][:self.num_selected]

    def __len__(self) -> int:
        return self.num_selected


class ShardSampler(_EpochSampler):
    """Each rank reads every world_size-th image of a (shuffled) order: DistributedSampler's split. With drop_last
    every rank gets floor(N / world_size) images; without it the order wraps so every rank gets ceil(N / world_size)
    (evaluation counts each image once per rank set and pads like DistributedSampler)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        super().__init__(num_samples, rank, world_size, seed, shuffle)
        self.drop_last = drop_last
        self.per_rank = num_samples // world_size if drop_last else int(math.ceil(num_samples / world_size))

    def indices(self, epoch: int) -> list[int]:
        order = self._order(epoch).tolist()
        total = self.per_rank * self.world_size
        if total > len(order) and order:
            order += (order * (total // len(order) + 1))[:total - len(order)]
        return order[self.rank:total:self.world_size]

    def __len__(self) -> int:
        return self.per_rank

    @property
    def real_count(self) -> int:
        """How many of this rank's images come before the padding (which is at the end of every rank's share), so
        an evaluation that counts only these counts each image exactly once over all ranks."""
        return max(0, min(self.per_rank, -(-(self.num_samples_total - self.rank) // self.world_size)))
