"""torch / PIL loader: decode with PIL in DataLoader workers, augment with torchvision transforms.

The fallback for machines without DALI, and the CPU path of the demo. Batches are dicts:
`image` [B, 3, S, S] float32 normalised, `label` [B] int64, `source` [B] uint8 (0 real, 1 synthetic).
"""
from __future__ import annotations

import os

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dermfast.data.records import ImageRecords

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(size: int, scale=(0.2, 1.0)):
    from torchvision import transforms as T
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(size: int, crop_fraction: float = 0.875):
    from torchvision import transforms as T
    return T.Compose([
        T.Resize(int(round(size / crop_fraction)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class RecordsDataset(Dataset):
    def __init__(self, records: ImageRecords, transform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        with Image.open(self.records.paths[i]) as im:
            img = self.transform(im.convert("RGB"))
        return {"image": img, "label": int(self.records.labels[i]), "source": int(self.records.source[i])}


def default_workers(requested: int = -1) -> int:
    return min(os.cpu_count() or 1, 8) if requested < 0 else requested


def build_torch_loader(records: ImageRecords, size: int, batch_size: int, train: bool, seed: int = 0,
                       workers: int = -1, drop_last: bool | None = None) -> DataLoader:
    """A seeded DataLoader: the same seed gives the same order and the same augmentations."""
    workers = default_workers(workers)
    ds = RecordsDataset(records, train_transform(size) if train else eval_transform(size))
    gen = torch.Generator().manual_seed(seed)
    if drop_last is None:  # a training set smaller than one batch still trains
        drop_last = train and len(ds) >= batch_size
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=drop_last,
                      num_workers=workers, generator=gen, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available())
