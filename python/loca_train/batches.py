"""Host side of the data: which images a step uses and every random draw of its views.

A batch is a pure function of (seed, step, rank): the images come from a per-epoch
permutation and the objective's view parameters (boxes, flips, turns, kept tokens, masks,
colour jitter, ...) from a generator seeded with (seed, step, rank) (objectives/*.py,
sample_batch). So any number of loader workers gives the same batches, and resuming at a step
gives exactly the batches an uninterrupted run sees.
"""
from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader

from .config import Config
from .images import BadImage
from .objectives import objective_of
from .sampling import step_generator


class StepBatches(torch.utils.data.Dataset):
    """Dataset indexed by step: item `step` is this rank's whole batch of that step, the
    NamedTuple of cfg.objective's sample_batch."""

    def __init__(self, images, cfg: Config, rank: int = 0, world_size: int = 1):
        self.images, self.cfg, self.rank, self.world_size = images, cfg, rank, world_size
        self.sample_batch = objective_of(cfg).sample_batch
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.cfg.steps

    def _image_index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.images))
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.images), generator=g)
        return int(self._order[offset])

    def __getitem__(self, step: int):
        cfg, batch = self.cfg, self.cfg.batch_size
        first = (step * self.world_size + self.rank) * batch
        bad = []
        images = [self._decodable_image(self._image_index(first + i), bad) for i in range(batch)]
        sizes = torch.tensor([tuple(image.shape[1:]) for image in images])      # (B, 2) height, width
        canvas = torch.zeros(batch, 3, *canvas_size(images, cfg.source_size), dtype=torch.uint8)
        for i, image in enumerate(images):
            canvas[i, :, :image.shape[1], :image.shape[2]] = image
        return self.sample_batch(cfg, canvas, sizes, torch.tensor(bad, dtype=torch.int64),
                                 step_generator(cfg.seed, step, self.rank))

    def _decodable_image(self, index: int, bad: list) -> torch.Tensor:
        """Image `index`, or when it cannot be decoded the next one (in file order) that can,
        with the skipped indices appended to `bad`: the batch stays a function of the step.
        The training loop decides whether skipping is allowed."""
        first = None
        for _ in range(len(self.images)):
            try:
                return self.images[index]
            except BadImage as error:
                first = first or error
                bad.append(index)
                index = (index + 1) % len(self.images)
        raise BadImage(f"none of the {len(self.images)} images can be decoded, e.g. {first}")


def canvas_size(images, source_size: int):
    """(height, width) of a batch's canvas: S x S, or at full resolution (source_size 0) the
    largest height and width of the batch's images."""
    if source_size:
        return source_size, source_size
    return max(image.shape[1] for image in images), max(image.shape[2] for image in images)


def _leave_stops_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore SIGINT and SIGTERM: a signal sent to the whole process group
    (Ctrl-C, a job scheduler) would kill them and the trainer would fail with "DataLoader
    worker is killed" before its checkpoint; the trainer stops after its step and the loader
    ends its workers (they also exit when the trainer dies)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def batch_loader(images, cfg: Config, start_step: int, rank: int, world_size: int) -> DataLoader:
    """Batches of steps start_step, ..., cfg.steps - 1, decoded by cfg.num_workers processes."""
    dataset = StepBatches(images, cfg, rank, world_size)
    # Its own generator: creating the loader must not consume the global RNG (resumed runs
    # create it at another step than uninterrupted ones).
    return DataLoader(dataset, batch_size=None, sampler=range(start_step, cfg.steps),
                      num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator(), worker_init_fn=_leave_stops_to_the_trainer)
