"""torch / PIL loader: decode with PIL in DataLoader workers, augment with torchvision transforms.

The fallback for machines without DALI; it implements the same `Augment` recipe as the DALI pipeline and
yields the same batches: dicts of `image` [B, 3, S, S] (float32, or `output_dtype`), `label` [B] int64 and
`source` [B] uint8 (0 real, 1 synthetic). Indices come from the shared `BalancedSampler` (train) or in order
(eval: every image exactly once, last partial batch kept). Augmentations are seeded: workers draw from
torch generators derived from `seed` and the epoch, so the same seed replays the same crops.
"""
from __future__ import annotations

import io
import os

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dermfast.data.augment import Augment
from dermfast.data.records import ImageRecords


def train_transform(aug: Augment):
    from torchvision import transforms as T
    ops = [T.RandomResizedCrop(aug.size, scale=aug.scale, ratio=aug.ratio,
                               interpolation=T.InterpolationMode.BICUBIC, antialias=True),
           T.RandomHorizontalFlip(aug.flip)]
    if aug.jitter:
        ops.append(T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(aug.mean, aug.std)])


def eval_transform(aug: Augment):
    from torchvision import transforms as T
    return T.Compose([
        T.Resize(int(round(aug.size / aug.crop_fraction)), interpolation=T.InterpolationMode.BICUBIC,
                 antialias=True),
        T.CenterCrop(aug.size),
        T.ToTensor(),
        T.Normalize(aug.mean, aug.std),
    ])


class RecordsDataset(Dataset):
    """records[i] -> {"image": [3, S, S] float32, "label": int, "source": int}, decoded from read_bytes(i)."""

    def __init__(self, records: ImageRecords, transform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        data = self.records.read_bytes(i)
        try:
            with Image.open(io.BytesIO(data)) as im:
                img = self.transform(im.convert("RGB"))
        except Exception as e:  # validated data should never get here; name the file if it does
            raise RuntimeError(f"could not decode {self.records.paths[i]}: {e}") from e
        return {"image": img, "label": int(self.records.labels[i]), "source": int(self.records.source[i])}


def default_workers(requested: int = -1) -> int:
    return min(os.cpu_count() or 1, 8) if requested < 0 else requested


class TorchLoader:
    """Iterable over batches; each full iteration is one epoch (the sampler's epoch advances by itself)."""

    backend = "torch"

    def __init__(self, records: ImageRecords, aug: Augment, batch_size: int, *, train: bool, sampler=None,
                 seed: int = 0, workers: int = -1, drop_last: bool | None = None,
                 output_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.records, self.sampler, self.train = records, sampler, train
        self.device, self.output_dtype = torch.device(device), output_dtype
        self.seed, self.epoch = seed, 0
        n = len(sampler) if sampler is not None else len(records)
        if drop_last is None:  # a training set smaller than one batch still trains
            drop_last = train and n >= batch_size
        workers = default_workers(workers)
        self._gen = torch.Generator()
        ds = RecordsDataset(records, train_transform(aug) if train else eval_transform(aug))
        self.loader = DataLoader(
            ds, batch_size=batch_size, sampler=sampler if train else None,
            shuffle=train and sampler is None, drop_last=drop_last, num_workers=workers,
            generator=self._gen, persistent_workers=False, pin_memory=self.device.type == "cuda")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        # Workers' augmentation seeds derive from this generator: keyed by (seed, epoch), so runs replay.
        self._gen.manual_seed(hash((self.seed, self.epoch)) & 0x7FFF_FFFF_FFFF_FFFF)
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        for batch in self.loader:
            yield {"image": batch["image"].to(self.device, self.output_dtype, non_blocking=True),
                   "label": batch["label"].to(self.device, non_blocking=True),
                   "source": batch["source"].to(torch.uint8).to(self.device, non_blocking=True)}
        self.epoch += 1
