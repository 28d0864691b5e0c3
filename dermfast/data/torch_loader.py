"""torch / PIL loader: decode with PIL in DataLoader workers, augment with torchvision's functional ops.

The fallback for machines without DALI; it implements the same `Augment` recipe as the DALI pipeline and
yields the same batches: dicts of `image` [B, 3, S, S] (float32, or `output_dtype`), `label` [B] int64 and
`source` [B] uint8 (0 real, 1 synthetic); when the records carry masks, also `mask` [B, 1, S, S] float32 in {0, 1}
(moved by the image's crop, flips and quarter turns with nearest-neighbour resampling, then `> 127`; colour jitter
never touches it; evaluation resizes and centre-crops it like the image) and `has_mask` [B] uint8 (0: that image
has no mask file, its `mask` is all zeros).

- Order: `EpochPlan` (shared with the DALI loader): the sampler's `rank_indices(epoch)` for training and, when
  a sampler is given, for evaluation too; without one, evaluation reads every image once in order (last partial
  batch kept) and training a permutation seeded by (seed, epoch).
- Augmentation: the per-sample crop window, flip and jitter factors come from `augment.sample_train_params`,
  keyed by (seed, rank, epoch, position in the epoch) like the DALI loader's; nothing depends on worker RNG
  state, so a resumed loader (`load_state_dict`) yields exactly the batches the original would have, and the
  two backends crop the same windows. Jitter runs in a fixed order (brightness, contrast, saturation, hue).
- Workers: one DataLoader with ``persistent_workers`` (when ``workers > 0``), kept for the loader's life; each
  epoch's (index, epoch, position) batches come from a batch sampler in the main process, so the workers never
  restart between epochs.
"""
from __future__ import annotations

import io
import signal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dermfast.data.augment import Augment, sample_train_params
from dermfast.data.loader_base import EpochPlan, cores_per_rank
from dermfast.data.records import ImageRecords


def eval_transform(aug: Augment):
    from torchvision import transforms as T
    return T.Compose([
        T.Resize(int(round(aug.size / aug.crop_fraction)), interpolation=T.InterpolationMode.BICUBIC,
                 antialias=True),
        T.CenterCrop(aug.size),
        T.ToTensor(),
        T.Normalize(aug.mean, aug.std),
    ])


def eval_mask_transform(aug: Augment):
    """A mask (PIL "L") -> [1, S, S] float32 in {0, 1}: the eval resize and centre crop, nearest neighbour."""
    from torchvision import transforms as T
    geometry = T.Compose([T.Resize(int(round(aug.size / aug.crop_fraction)),
                                   interpolation=T.InterpolationMode.NEAREST),
                          T.CenterCrop(aug.size)])
    return lambda m: mask_tensor(geometry(m))


def mask_tensor(m: Image.Image) -> torch.Tensor:
    """PIL "L" mask -> [1, H, W] float32, 1 where the value is above 127 (masks are stored 0 / 255)."""
    return torch.from_numpy((np.asarray(m) > 127).astype(np.float32))[None]


_ROTATE = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def train_geometry(im: Image.Image, p: dict, size: int, interpolation) -> Image.Image:
    """Crop window -> size x size, then hflip, vflip, and p["rot90"] counter-clockwise quarter turns."""
    from torchvision.transforms import functional as F
    im = F.resized_crop(im, int(p["y"]), int(p["x"]), int(p["h"]), int(p["w"]), [size, size],
                        interpolation=interpolation, antialias=True)
    if p["flip"]:
        im = F.hflip(im)
    if p.get("vflip", 0):
        im = F.vflip(im)
    k = int(p.get("rot90", 0)) % 4
    return im.transpose(_ROTATE[k]) if k else im


class TrainTransform:
    """(PIL image, params of one sample from `sample_train_params`) -> [3, S, S] float32, normalised;
    `mask_of(mask, p)` moves a PIL "L" mask the same way (nearest neighbour) -> [1, S, S] float32 in {0, 1}."""

    def __init__(self, aug: Augment):
        self.aug = aug

    def mask_of(self, mask: Image.Image, p: dict) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        return mask_tensor(train_geometry(mask, p, self.aug.size, InterpolationMode.NEAREST))

    def __call__(self, im: Image.Image, p: dict) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F
        a = self.aug
        im = train_geometry(im, p, a.size, InterpolationMode.BICUBIC)
        if a.brightness:
            im = F.adjust_brightness(im, float(p["brightness"]))
        if a.contrast:
            im = F.adjust_contrast(im, float(p["contrast"]))
        if a.saturation:
            im = F.adjust_saturation(im, float(p["saturation"]))
        if a.hue:
            im = F.adjust_hue(im, float(p["hue"]))
        return F.normalize(F.to_tensor(im), a.mean, a.std)


class RecordsDataset(Dataset):
    """(i, epoch, position) -> {"image": [3, S, S] float32, "label": int, "source": int}, from read_bytes(i);
    with masks in the records also "mask" [1, S, S] float32 in {0, 1} and "has_mask" (0 / 1).

    Training augments with the parameters of (seed, rank, epoch, position); evaluation ignores epoch and position.
    """

    def __init__(self, records: ImageRecords, aug: Augment, train: bool, seed: int = 0, rank: int = 0):
        self.records, self.aug, self.train, self.seed, self.rank = records, aug, train, int(seed), int(rank)
        self.transform = TrainTransform(aug) if train else eval_transform(aug)
        self.mask_transform = None if train else eval_mask_transform(aug)

    def __len__(self) -> int:
        return len(self.records)

    def _mask(self, i: int, size: tuple[int, int]) -> Image.Image | None:
        data = self.records.read_mask_bytes(i)
        if data is None:
            return None
        with Image.open(io.BytesIO(data)) as m:
            m = m.convert("L")
        if m.size != size:
            raise RuntimeError(f"mask {self.records.masks[i]} is {m.size[0]}x{m.size[1]}, its image "
                               f"{self.records.origins[i]} {size[0]}x{size[1]} (validate_records skips these)")
        return m

    def __getitem__(self, key):
        i, epoch, position = key if isinstance(key, tuple) else (key, 0, 0)
        data = self.records.read_bytes(i)
        out = {}
        try:
            with Image.open(io.BytesIO(data)) as im:
                mask = self._mask(i, im.size) if self.records.has_masks else None
                if self.train:
                    p = sample_train_params(self.aug, self.seed, self.rank, epoch, [position], [im.width],
                                            [im.height])
                    p = {k: v[0] for k, v in p.items()}
                    img = self.transform(im.convert("RGB"), p)
                    if mask is not None:
                        out["mask"] = self.transform.mask_of(mask, p)
                else:
                    img = self.transform(im.convert("RGB"))
                    if mask is not None:
                        out["mask"] = self.mask_transform(mask)
        except Exception as e:  # validated data should never get here; name the file if it does
            raise RuntimeError(f"could not decode {self.records.paths[i]}: {e}") from e
        if self.records.has_masks:
            out["has_mask"] = int(mask is not None)
            if mask is None:
                out["mask"] = torch.zeros(1, img.shape[1], img.shape[2])
        return {"image": img, "label": int(self.records.labels[i]), "source": int(self.records.source[i]), **out}


class _PlannedBatches:
    """DataLoader batch sampler: the current epoch's batches as lists of (index, epoch, position)."""

    def __init__(self, plan: EpochPlan):
        self.plan, self.current = plan, (0, 0, 0)

    def __len__(self) -> int:
        return self.current[2]

    def __iter__(self):
        epoch, start, batches = self.current
        order = self.plan.order(epoch)
        for k in range(batches):
            lo, hi = self.plan.batch_rows(epoch, start, k)
            yield [(int(order[p]), epoch, p) for p in range(lo, hi)]


def ignore_sigint(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a terminal Ctrl-C signals the whole process group, workers included; the
    main process turns SIGINT into "finish the step, checkpoint", so a worker must not die of it (the next batch
    would raise "DataLoader worker exited unexpectedly" instead). The main process still stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers(requested: int = -1) -> int:
    """DataLoader workers: `requested`, or for -1 this rank's cores, at most 8."""
    return min(cores_per_rank(), 8) if requested < 0 else requested


class TorchLoader:
    """Iterable over batches; each iteration is one epoch (then the next epoch is pending); see the module doc."""

    backend = "torch"

    def __init__(self, records: ImageRecords, aug: Augment, batch_size: int, *, train: bool, sampler=None,
                 seed: int = 0, workers: int = -1, drop_last: bool | None = None,
                 output_dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if int(batch_size) < 1:
            raise ValueError(f"TorchLoader: batch_size must be >= 1, got {batch_size}")
        self.records, self.sampler, self.train, self.seed = records, sampler, bool(train), int(seed)
        self.device, self.output_dtype = torch.device(device), output_dtype
        self.plan = EpochPlan(len(records), int(batch_size), train=self.train, sampler=sampler, seed=self.seed,
                              drop_last=drop_last)
        self.workers = default_workers(workers)
        self._batches = _PlannedBatches(self.plan)
        ds = RecordsDataset(records, aug, self.train, self.seed, self.plan.rank)
        # Its own generator: DataLoader draws each new iterator's worker base seed from it, never from the global
        # RNG (a resumed run creates its iterator elsewhere in that stream, so dropout / masking would differ).
        self.loader = DataLoader(ds, batch_sampler=self._batches, num_workers=self.workers,
                                 generator=torch.Generator().manual_seed(self.seed),
                                 persistent_workers=self.workers > 0,
                                 worker_init_fn=ignore_sigint if self.workers > 0 else None, pin_memory=self.device.type == "cuda")
        self._active = None

    @property
    def epoch(self) -> int:
        return self.plan.epoch

    def set_epoch(self, epoch: int) -> None:
        self.plan.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches in a full epoch (the next one; a resumed epoch yields fewer)."""
        return self.plan.num_batches(self.plan.epoch)

    def state_dict(self) -> dict:
        return self.plan.state_dict()

    def load_state_dict(self, state) -> None:
        self.plan.load_state_dict(state)

    def __iter__(self):
        self._batches.current = self.plan.begin()
        token = object()
        self._active = token
        return self._run(token)

    def _run(self, token):
        try:
            for batch in self.loader:
                if self._active is not token:
                    raise RuntimeError("TorchLoader: this epoch's iterator was superseded by a newer "
                                       "iter(loader); iterate one epoch at a time")
                self.plan.advance(len(batch["label"]))
                out = {"image": batch["image"].to(self.device, self.output_dtype, non_blocking=True),
                       "label": batch["label"].to(self.device, non_blocking=True),
                       "source": batch["source"].to(torch.uint8).to(self.device, non_blocking=True)}
                if "mask" in batch:
                    out["mask"] = batch["mask"].to(self.device, non_blocking=True)
                    out["has_mask"] = batch["has_mask"].to(torch.uint8).to(self.device, non_blocking=True)
                yield out
        finally:
            if self._active is token:
                self.plan.finish()

