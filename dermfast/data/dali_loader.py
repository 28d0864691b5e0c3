"""NVIDIA DALI loader: decode and augment on the GPU (``device="gpu"``) or in DALI's CPU threads (``device="cpu"``).

Batches are dicts, as from the torch loader: ``image`` [B, 3, S, S] normalised (float32, float16 or bfloat16),
``label`` [B] int64, ``source`` [B] uint8 (0 real, 1 synthetic), all on ``cuda:device_id`` for the GPU pipeline
and on the CPU for the CPU pipeline. The recipe is `Augment`'s.

Install: ``uv pip install nvidia-dali-cuda130`` (one wheel for CPU and GPU; the CPU pipeline runs without a GPU
or a CUDA driver). Without DALI this module still imports; `DaliLoader(...)` raises ImportError saying so.

Design
  * Input: ``fn.external_source`` with a batch callback (`_BatchSource`), because DALI's file readers cannot
    take a user sampler. Each epoch's index order comes from the sampler (``set_epoch(e)``, then iterated, so a
    sampler restored with ``load_state_dict`` resumes mid-epoch) or, without one, is ``range(N)`` in order for
    eval and a permutation seeded by (seed, epoch) for train. The callback reads encoded bytes with
    ``records.read_bytes(i)`` and returns (encoded uint8, label int64, source uint8) for batch ``k``; past the
    last batch it raises StopIteration, which ends the epoch. Eval keeps the last partial batch (external_source
    allows smaller batches; ``batch_size`` is the maximum); train drops it by default when the epoch holds at
    least one full batch.
  * Epochs: iterating the loader runs the next epoch (an internal counter, `set_epoch(e)` to move it; a sampler
    moved by the caller with ``sampler.set_epoch`` / ``load_state_dict`` is followed). A train epoch builds a
    fresh pipeline seeded with hash(seed, rank, epoch), so epoch e's order *and* augmentations are a pure
    function of (seed, rank, epoch): a run resumed at an epoch boundary sees exactly what an uninterrupted run
    saw, and ranks draw different augmentations. A build costs ~0.1 s on the CPU (more for the GPU decoder's
    buffers), negligible per epoch. An eval pipeline has no randomness and is reused (``reset()``) while its
    order does not change. An epoch left early (``break``) or failed is thrown away, and the next one rebuilds.
  * Train: ``fn.decoders.image_random_crop`` (decode + random crop with area ``aug.scale`` and aspect
    ``aug.ratio``, the same window distribution as ``fn.random_resized_crop``), then ``fn.resize`` to S x S. The
    fused op decodes only the crop's region of interest (libjpeg-turbo skips the scanlines outside it on the CPU;
    nvJPEG ROI decode on the GPU, NVIDIA's own ResNet-50 DALI recipe): on 1024x768 JPEGs, 224 px, 2 CPU threads
    it was 1.1-1.2x faster than ``decoders.image`` + ``random_resized_crop`` (median 190 vs 174 img/s bicubic,
    223 vs 182 bilinear).
    Then colour jitter (below), and ``fn.crop_mirror_normalize`` with ``mirror = fn.random.coin_flip(aug.flip)``,
    mean/std in 0..255 units, layout CHW.
  * Colour jitter, torchvision ColorJitter semantics: brightness b and contrast c factors uniform in
    [max(0, 1-x), 1+x]; ``fn.brightness_contrast`` with ``contrast_center`` = the image's mean grey level
    (0.299 R + 0.587 G + 0.114 B), which is exactly torchvision's ``adjust_contrast`` (blend with the grey
    mean); brightness and contrast commute, so their order does not matter. Saturation factor uniform in
    [max(0, 1-s), 1+s] and hue shift uniform in [-h, h] turns (= +-360 h degrees) through ``fn.hsv``, which
    DALI approximates by a linear transform in RGB (torchvision converts to HSV exactly, and draws the order of
    the four ops at random; here the order is fixed: brightness/contrast, then saturation/hue).
  * Eval: ``fn.decoders.image``, ``fn.resize(resize_shorter=round(S / aug.crop_fraction))``, centre crop S in
    ``crop_mirror_normalize``.
  * Interpolation: ``interp="bicubic"`` (default; the torch loader's choice, antialiased when shrinking) or
    ``"bilinear"`` (antialiased, cheaper on the CPU).
  * Output dtype: crop_mirror_normalize writes float32 or float16 directly. DALI has no bfloat16 type, so
    ``output_dtype=torch.bfloat16`` has DALI write float32, cast by torch after the transfer (on the GPU for the
    GPU pipeline).
  * Transfer to torch: with DALI's default (dynamic) executor, outputs are reference-counted buffers that DALI
    does not reuse while a consumer holds them, so ``torch.from_dlpack`` is zero-copy and safe (the same path as
    DALI's own ``DALIGenericIterator``); a tensor from batch k is never overwritten by batch k+1. With the legacy
    executor the data is copied (``feed_ndarray``).
  * ``parallel=True``: the callback runs in ``py_workers`` Python processes (DALI's parallel external source,
    ``batch=True`` with ``batch_info``; `_BatchSource` is a plain picklable class holding the epoch's records
    subset, so it works with both "fork" and "spawn"; "spawn" is used when CUDA is initialised, as fork is
    then impossible, and needs ``records.store`` to be picklable). It pays off when reading the bytes is slow
    Python work (a remote filesystem, a compressed store); for local files the callback is ~0.1 ms an image
    against ~5-10 ms of decoding, and the worker processes only take CPU from DALI's decoder threads. Measured on
    a 2-core machine (local 1024x768 JPEGs) it did not help: 1024-image epochs ran at the same rate (~155-170
    img/s either way), and as a train epoch builds a fresh pipeline, the workers restart every epoch (~0.1-0.3 s
    with fork, seconds with spawn, which imports torch in each worker), so 256-image epochs were ~40% slower.
    The default is off.
  * Decode failures: DALI's error ("Critical error in pipeline ... nvImageCodec failure") does not name the
    file. The loader re-raises a RuntimeError naming the epoch, the batch, the file(s) PIL cannot decode either,
    and the batch's files; the pipeline is rebuilt on the next epoch.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator

import numpy as np
import torch

from dermfast._optional import DALI_REASON, HAS_DALI
from dermfast.data.augment import Augment
from dermfast.data.records import ImageRecords

DALI_INSTALL_HINT = "uv pip install nvidia-dali-cuda130"
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "FLOAT"}  # bf16: cast in torch
_INTERP = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR"}


def _import_dali():
    if not HAS_DALI:
        raise ImportError(f"DaliLoader needs NVIDIA DALI, which is not available ({DALI_REASON}). "
                          f"Install it with `{DALI_INSTALL_HINT}`, or use the torch loader "
                          f"(dermfast.data.torch_loader).")
    try:
        from nvidia import dali
        from nvidia.dali import fn, types
    except Exception as e:  # installed but broken (ABI, missing libs)
        raise ImportError(f"DaliLoader: `import nvidia.dali` failed ({type(e).__name__}: {e}); reinstall with "
                          f"`{DALI_INSTALL_HINT}`, or use the torch loader") from e
    return dali, fn, types


def _seed_for(seed: int, rank: int, epoch: int | None) -> int:
    """A 31-bit pipeline seed from (seed, rank, epoch): ranks and epochs draw independent augmentations."""
    key = [int(seed), int(rank)] + ([] if epoch is None else [int(epoch)])
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint32)[0] & 0x7FFFFFFF)


class _BatchSource:
    """external_source callback for one epoch: batch ``info.iteration`` of ``order``.

    A plain class (no closures, no loader reference) so that DALI's parallel mode can pickle it to worker
    processes. Holds ``records.subset(order)``: the epoch's paths / labels / sources in order (and the store).
    """

    def __init__(self, records: ImageRecords, order: np.ndarray, batch_size: int, drop_last: bool):
        self.records = records.subset(order)
        self.batch_size = int(batch_size)
        n = len(order)
        self.num_batches = n // self.batch_size if drop_last else -(-n // self.batch_size)

    def batch_range(self, k: int) -> range:
        return range(k * self.batch_size, min((k + 1) * self.batch_size, len(self.records)))

    def __call__(self, info):
        k = int(getattr(info, "iteration", info))
        if k >= self.num_batches:  # also for prefetch calls past the end: DALI may ask a few batches ahead
            raise StopIteration
        rows = self.batch_range(k)
        rec = self.records
        encoded = [np.frombuffer(rec.read_bytes(i), dtype=np.uint8) for i in rows]
        return encoded, rec.labels[rows.start:rows.stop].copy(), rec.source[rows.start:rows.stop].copy()


class DaliLoader:
    """Iterable over batches {"image", "label", "source"}; each iteration is one epoch (see the module doc).

    records      ImageRecords (files or a store; read with ``read_bytes``).
    aug          the Augment recipe: train uses size/scale/ratio/flip/jitter/mean/std, eval size/crop_fraction.
    batch_size   the (maximum) batch size.
    train        random augmentation and drop_last by default; eval: every image once, in order (or in the
                 sampler's order when a sampler is given, e.g. a sharded eval).
    sampler      a BalancedSampler-like object (set_epoch, __iter__, rank_indices, epoch, rank); None: see above.
    device       "gpu" (decode on the GPU with nvJPEG, tensors on cuda:device_id) or "cpu".
    device_id    CUDA device for "gpu" (default: torch's current device); ignored for "cpu".
    seed         augmentation seed (hashed with the sampler's rank and the epoch).
    num_threads  DALI CPU worker threads.
    output_dtype torch.float32, torch.float16 or torch.bfloat16 (bf16 is cast by torch; DALI has no bf16).
    drop_last    drop the epoch's last partial batch; None: train and the epoch holds >= batch_size samples.
    parallel     run the read callback in ``py_workers`` processes (DALI parallel external_source).
    prefetch     DALI prefetch queue depth (batches in flight), also the parallel source's queue depth.
    interp       "bicubic" or "bilinear".
    """

    def __init__(self, records: ImageRecords, aug: Augment, batch_size: int, *, train: bool, sampler=None,
                 device: str = "gpu", device_id: int | None = None, seed: int = 0, num_threads: int = 4,
                 output_dtype: torch.dtype = torch.float32, drop_last: bool | None = None, parallel: bool = False,
                 prefetch: int = 2, py_workers: int = 2, py_start_method: str | None = None,
                 interp: str = "bicubic"):
        if device not in ("gpu", "cpu"):
            raise ValueError(f"DaliLoader: device must be 'gpu' or 'cpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise ValueError("DaliLoader: device='gpu' needs a CUDA GPU, and none is visible "
                             "(torch.cuda.is_available() is False); use device='cpu' for DALI's CPU pipeline")
        if output_dtype not in _DTYPES:
            raise ValueError(f"DaliLoader: output_dtype must be torch.float32, torch.float16 or torch.bfloat16, "
                             f"got {output_dtype}")
        if interp not in _INTERP:
            raise ValueError(f"DaliLoader: interp must be one of {', '.join(_INTERP)}, got {interp!r}")
        if int(batch_size) < 1:
            raise ValueError(f"DaliLoader: batch_size must be >= 1, got {batch_size}")
        if num_threads < 1 or prefetch < 1 or (parallel and py_workers < 1):
            raise ValueError("DaliLoader: num_threads, prefetch and py_workers must be >= 1")
        if len(records) == 0:
            raise ValueError("DaliLoader: no images (empty ImageRecords)")
        if not 0 < aug.crop_fraction <= 1:
            raise ValueError(f"DaliLoader: aug.crop_fraction must be in (0, 1], got {aug.crop_fraction}")
        self._dali = _import_dali()
        if device == "gpu":
            n = torch.cuda.device_count()
            device_id = torch.cuda.current_device() if device_id is None else int(device_id)
            if not 0 <= device_id < n:
                raise ValueError(f"DaliLoader: device_id {device_id} is not one of the {n} visible CUDA devices")
        else:
            device_id = None
        if py_start_method is None:  # fork is impossible once CUDA is initialised in this process
            py_start_method = "spawn" if device == "gpu" or torch.cuda.is_initialized() else "fork"
        self.records, self.aug, self.batch_size, self.train = records, aug, int(batch_size), bool(train)
        self.sampler, self.device, self.device_id, self.seed = sampler, device, device_id, int(seed)
        self.num_threads, self.output_dtype, self.drop_last = int(num_threads), output_dtype, drop_last
        self.parallel, self.prefetch, self.py_workers = bool(parallel), int(prefetch), int(py_workers)
        self.py_start_method, self.interp = py_start_method, interp
        self.rank = int(getattr(sampler, "rank", 0) or 0)
        self._epoch = int(getattr(sampler, "epoch", 0)) if sampler is not None else 0
        self._sampler_epoch_seen = self._epoch
        self._pipe = None
        self._pipe_order: np.ndarray | None = None  # eval: the order the live pipeline was built for
        self._pipe_clean = False                     # the live pipeline finished its last epoch (reusable)
        self._active = None                          # token of the running epoch's iterator
        self._consumed = 0                           # samples yielded this epoch, counting a resume offset
        self._current_epoch = self._epoch            # the epoch being (or last) iterated
        self._len_cache: tuple[int, int] | None = None

    # --- epochs and order -------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next iteration runs."""
        if self.sampler is not None and self.sampler.epoch != self._sampler_epoch_seen:
            return int(self.sampler.epoch)
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run `epoch` (and move the sampler there)."""
        self._epoch = int(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self._epoch)
            self._sampler_epoch_seen = self._epoch

    def _full_order(self, epoch: int) -> np.ndarray:
        if self.sampler is not None:
            return np.asarray(self.sampler.rank_indices(epoch), dtype=np.int64)
        if self.train:
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.records)).astype(np.int64)
        return np.arange(len(self.records), dtype=np.int64)

    def _take_order(self, epoch: int) -> tuple[np.ndarray, int]:
        """This epoch's order, and how many samples a resumed sampler skips at its start."""
        if self.sampler is None:
            return self._full_order(epoch), 0
        self.sampler.set_epoch(epoch)
        self._sampler_epoch_seen = epoch
        order = np.fromiter(iter(self.sampler), dtype=np.int64)  # honours a load_state_dict position
        return order, len(self.sampler.rank_indices(epoch)) - len(order)

    def _drop_last(self, n: int) -> bool:
        return (self.train and n >= self.batch_size) if self.drop_last is None else bool(self.drop_last)

    def _num_batches(self, n: int) -> int:
        return n // self.batch_size if self._drop_last(n) else -(-n // self.batch_size)

    def __len__(self) -> int:
        """Batches in the next epoch (a full epoch: a resumed sampler's skipped samples are counted)."""
        e = self.epoch
        if self._len_cache is None or self._len_cache[0] != e:
            self._len_cache = (e, self._num_batches(len(self._full_order(e))))
        return self._len_cache[1]

    @property
    def consumed(self) -> int:
        """Samples of the current epoch handed out so far (including a resumed sampler's skipped ones)."""
        return self._consumed

    def state_dict(self) -> dict:
        """The sampler's state with ``position`` = samples actually handed out (not DALI's prefetch)."""
        if self.sampler is None:
            return {"epoch": self._current_epoch, "consumed": self._consumed}
        return self.sampler.state_dict(consumed=self._consumed)

    # --- pipeline ---------------------------------------------------------------------------------------
    def _build(self, source: _BatchSource, seed: int):
        dali, fn, types = self._dali
        aug, gpu, s = self.aug, self.device == "gpu", int(self.aug.size)
        interp = getattr(types, _INTERP[self.interp])
        # The dynamic executor (DALI >= 2.0's default; asked for explicitly for older 1.x releases) is what makes
        # zero-copy DLPack outputs safe and allows the GPU->CPU `.cpu()` used by the contrast jitter.
        dynamic = {"exec_dynamic": True} if "exec_dynamic" in inspect.signature(dali.Pipeline).parameters else {}
        pipe = dali.Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                             device_id=self.device_id if gpu else None, seed=seed,
                             prefetch_queue_depth=self.prefetch, py_num_workers=self.py_workers,
                             py_start_method=self.py_start_method, **dynamic)
        with pipe:
            extra = {"parallel": True, "prefetch_queue_depth": self.prefetch} if self.parallel else {}
            encoded, label, src = fn.external_source(
                source=source, num_outputs=3, batch=True, batch_info=True,
                dtype=[types.UINT8, types.INT64, types.UINT8], ndim=[1, 0, 0], **extra)
            decoder = "mixed" if gpu else "cpu"
            if self.train:
                img = fn.decoders.image_random_crop(encoded, device=decoder, output_type=types.RGB,
                                                    random_area=[float(v) for v in aug.scale],
                                                    random_aspect_ratio=[float(v) for v in aug.ratio],
                                                    num_attempts=10)
                img = fn.resize(img, size=[s, s], interp_type=interp, antialias=True)
                img = self._jitter(img, fn, gpu)
                mirror = fn.random.coin_flip(probability=float(aug.flip)) if aug.flip > 0 else 0
                crop = {}
            else:
                img = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
                img = fn.resize(img, resize_shorter=round(s / aug.crop_fraction), interp_type=interp,
                                antialias=True)
                mirror, crop = 0, {"crop": [s, s], "crop_pos_x": 0.5, "crop_pos_y": 0.5}
            image = fn.crop_mirror_normalize(img, mirror=mirror, mean=[255.0 * m for m in aug.mean],
                                             std=[255.0 * v for v in aug.std],
                                             dtype=getattr(types, _DTYPES[self.output_dtype]),
                                             output_layout="CHW", **crop)
            if gpu:
                label, src = label.gpu(), src.gpu()
            pipe.set_outputs(image, label, src)
        pipe.build()
        return pipe

    def _jitter(self, img, fn, gpu: bool):
        a = self.aug
        if a.brightness or a.contrast:
            kw = {}
            if a.brightness:
                kw["brightness"] = fn.random.uniform(range=[max(0.0, 1 - a.brightness), 1 + a.brightness])
            if a.contrast:
                kw["contrast"] = fn.random.uniform(range=[max(0.0, 1 - a.contrast), 1 + a.contrast])
                mean = fn.reductions.mean(img, axes=[0, 1])  # per-channel mean, [3]
                grey = mean[0] * _GREY[0] + mean[1] * _GREY[1] + mean[2] * _GREY[2]
                kw["contrast_center"] = grey.cpu() if gpu else grey  # argument inputs live on the CPU
            img = fn.brightness_contrast(img, **kw)
        if a.saturation or a.hue:
            kw = {}
            if a.saturation:
                kw["saturation"] = fn.random.uniform(range=[max(0.0, 1 - a.saturation), 1 + a.saturation])
            if a.hue:
                kw["hue"] = fn.random.uniform(range=[-360.0 * a.hue, 360.0 * a.hue])  # a.hue: fraction of a turn
            img = fn.hsv(img, **kw)
        return img

    def _release(self) -> None:
        # Dropping the last reference frees DALI's pipeline and stops its Python workers.
        self._pipe, self._pipe_order, self._pipe_clean = None, None, False

    # --- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        epoch = self.epoch
        order, skipped = self._take_order(epoch)
        self._current_epoch, self._epoch = epoch, epoch + 1
        drop_last = self._drop_last(len(order))
        source = _BatchSource(self.records, order, self.batch_size, drop_last)
        reuse = (not self.train and self._pipe is not None and self._pipe_clean
                 and self._pipe_order is not None and np.array_equal(self._pipe_order, order))
        if not reuse:
            self._release()
            seed = _seed_for(self.seed, self.rank, epoch if self.train else None)
            self._pipe = self._build(source, seed)
            self._pipe_order = None if self.train else order
        self._consumed = skipped
        self._pipe_clean = False
        token = object()
        self._active = token
        return self._run(epoch, source, token, skipped)

    def _run(self, epoch: int, source: _BatchSource, token, skipped: int) -> Iterator[dict]:
        pipe, finished = self._pipe, False
        try:
            for k in range(source.num_batches + 1):
                if self._active is not token:
                    raise RuntimeError("DaliLoader: this epoch's iterator was superseded by a newer "
                                       "iter(loader); iterate one epoch at a time")
                try:
                    outs = pipe.run()
                except StopIteration:
                    if k != source.num_batches:
                        raise RuntimeError(f"DaliLoader: DALI ended epoch {epoch} after {k} batches, "
                                           f"expected {source.num_batches}") from None
                    pipe.reset()
                    finished = True
                    if self._pipe is pipe:
                        self._pipe_clean = True
                    return
                except RuntimeError as e:
                    raise self._decode_error(e, epoch, k, source) from e
                batch = self._to_torch(pipe, outs)
                self._consumed = skipped + source.batch_range(k).stop
                yield batch
            raise RuntimeError(f"DaliLoader: DALI gave more than the {source.num_batches} batches of "
                               f"epoch {epoch}")
        finally:
            if not finished and self._pipe is pipe:  # left early or failed: never reuse a half-run pipeline
                self._release()

    def _to_torch(self, pipe, outs) -> dict:
        image, label, src = (self._tensor(pipe, o) for o in outs)
        if self.output_dtype is torch.bfloat16:
            image = image.to(torch.bfloat16)
        return {"image": image, "label": label, "source": src}

    def _tensor(self, pipe, tl) -> torch.Tensor:
        t = tl.as_tensor()  # the batch as one dense tensor (uniform sample shapes)
        if pipe.exec_dynamic:
            # Reference-counted output: DALI does not reuse this buffer while the DLPack capsule holds it.
            if self.device == "gpu":
                with torch.cuda.device(self.device_id):
                    return torch.from_dlpack(t)
            return torch.from_dlpack(t)
        from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
        dev = torch.device("cuda", self.device_id) if self.device == "gpu" else torch.device("cpu")
        out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=dev)
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(dev) if self.device == "gpu" else None)
        return out

    def _decode_error(self, err: Exception, epoch: int, k: int, source: _BatchSource) -> RuntimeError:
        """DALI's error names no file: find the batch's files that PIL cannot decode either, name them all."""
        rows = source.batch_range(k)
        rec = source.records
        paths = [rec.paths[i] for i in rows]
        bad = []
        for i in rows:
            reason = _pil_decode_error(rec, i)
            if reason is not None:
                bad.append(f"{rec.paths[i]} ({reason})")
        shown = ", ".join(paths[:32]) + (f", ... ({len(paths) - 32} more)" if len(paths) > 32 else "")
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and "no longer valid" not in ln
                 and not ln.startswith("Critical error")]
        what = next((ln for ln in reversed(lines) if "fail" in ln.lower() or "decode" in ln.lower()),
                    lines[-1] if lines else type(err).__name__)
        culprit = (f"undecodable: {'; '.join(bad)}" if bad else
                   "PIL decodes every file of the batch, so the cause may be DALI-specific")
        return RuntimeError(f"DaliLoader: DALI failed on batch {k} of epoch {epoch} ({what.strip()}); {culprit}. "
                            f"Batch files: {shown}")


def _pil_decode_error(records: ImageRecords, i: int) -> str | None:
    import io

    from PIL import Image, UnidentifiedImageError
    try:
        data = records.read_bytes(i)
        if not data:
            return "empty file"
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return None
    except UnidentifiedImageError:
        return "not a recognised image format"
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return f"{type(e).__name__}: {e}"
