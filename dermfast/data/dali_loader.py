"""NVIDIA DALI loader: decode and augment on the GPU (``device="gpu"``) or in DALI's CPU threads (``device="cpu"``).

Batches are dicts, as from the torch loader: ``image`` [B, 3, S, S] normalised (float32, float16 or bfloat16),
``label`` [B] int64, ``source`` [B] uint8 (0 real, 1 synthetic), all on ``cuda:device_id`` for the GPU pipeline
and on the CPU for the CPU pipeline. The recipe is `Augment`'s; epochs, resume and state are `EpochPlan`'s.

Install: ``uv pip install nvidia-dali-cuda130`` (one wheel for CPU and GPU; the CPU pipeline runs without a GPU
or a CUDA driver). Without DALI this module still imports; `DaliLoader(...)` raises ImportError saying so.

Design
  * Built once. A loader builds ONE DALI pipeline, on its first iteration, and runs every epoch through it
    (``builds`` counts builds: 1 unless an epoch failed, which throws the pipeline away). A rebuild per epoch
    cost 2-3 s per epoch boundary on an H100 (decoder buffers, worker processes).
  * Input: ``fn.external_source`` with a batch callback (`_BatchSource`), since DALI's file readers cannot take a
    user sampler. The pipeline streams epochs without a break: DALI numbers its own epochs
    (``BatchInfo.epoch_idx``, +1 per ``reset()``) and iterations; a tiny int64 table (`_Plan`) says where DALI
    epoch j starts (our epoch, start position), and the callback maps iteration i to batch k of epoch e by
    walking `EpochPlan.num_batches` from there (epoch e + 1 follows epoch e from its start), reading the rows of
    the sampler's ``rank_indices(e)``, a pure function of the epoch that a worker process computes as well. So
    DALI's prefetch runs across epoch boundaries: when the training loop takes the last batch of epoch e, the
    first batches of e + 1 are already being read and decoded, and the boundary costs what a batch costs, not a
    rebuild (dali-cpu on a loaded 2-core CPU, bench_loader --quick: 29 ms boundary, 25 ms a batch; the GPU
    pipeline is unmeasured). A loader asked for something else (``set_epoch`` to another epoch,
    ``load_state_dict`` after running, an epoch left with ``break``) ends the DALI epoch by lowering its
    ``stop`` in the table, drains the few batches already in flight, resets and streams from the new place
    (``restarts`` counts these): still no rebuild. Every batch carries its (epoch, position) per sample, which
    the loader checks against what is due.
  * Augmentation parameters come from the host: `augment.sample_train_params` draws each sample's crop window, flip
    and jitter factors from a hash of (seed, rank, epoch, position in the epoch), using the image size read from the
    encoded header (`augment.image_size`, microseconds a JPEG). They reach DALI as per-sample tensors of the same
    external source: the window as ``fn.decoders.image_slice``'s anchor / shape inputs (absolute int32, "WH"; DALI
    decodes only that region where the decoder allows it: libjpeg-turbo skips the scanlines outside it on the CPU,
    nvJPEG has ROI decoding on the GPU), the flip as ``crop_mirror_normalize``'s ``mirror``, the factors as
    arguments. DALI's own RNG is not used, so two loaders with the same seed give identical batches, and a resumed
    loader continues with exactly the batches the original would have given. The torch loader applies the same
    parameters. ``adjust_orientation=False``: the stored pixel grid, as PIL (and the torch loader) sees it, so
    windows mean the same in both.
  * Train graph: image_slice -> ``fn.resize`` to S x S (antialiased) -> colour jitter -> crop_mirror_normalize
    (mean / std in 0..255 units, CHW, output dtype written directly: float32 or float16).
    Eval graph: ``fn.decoders.image`` -> ``fn.resize(size=...)`` -> crop S at a per-sample position in
    crop_mirror_normalize, both from the host (`augment.eval_geometry`: torchvision's resize + CenterCrop
    rounding, so DALI and the torch loader crop the same pixels).
  * Colour jitter, torchvision ColorJitter semantics in a fixed order (brightness, contrast, saturation, hue):
    brightness b and contrast c as one fused DALI arithmetic expression ``b * (g + c * (img - g))`` cast back
    to uint8 (rounded, saturated), where g is the image's mean grey level (0.299 R + 0.587 G + 0.114 B, from
    ``fn.reductions.mean``): torchvision's blend with the grey mean, and on the CPU bit-identical to
    ``fn.brightness_contrast`` with ``contrast_center = g``. Written as arithmetic because
    ``brightness_contrast`` takes ``contrast_center`` only as a CPU argument, which on the GPU meant a device ->
    host copy (``.cpu()``) of g every batch; here g stays on the GPU. Saturation and hue (in degrees = 360 x
    turns) through ``fn.hsv``, which DALI approximates by a linear transform in RGB (torchvision converts to HSV
    exactly).
  * GPU decoder ("mixed"): ``hw_decoder_load=0.99`` (the share of JPEGs sent to the hardware JPEG engine of
    A100 / H100 / H200; nvJPEG ignores it on GPUs without one; DALI's default 0.65 leaves a third for the CPU
    threads), ``preallocate_width_hint`` / ``height_hint`` from the largest of the first images' headers (the
    HW decoder's buffers sized once), ``device_memory_padding`` / ``host_memory_padding`` at least the decoded
    size of that image (no reallocation as sizes vary), ``hybrid_huffman_threshold=500_000`` pixels (1024x768
    photos, under DALI's 1 MP default, then take nvJPEG's GPU-assisted Huffman path for the share not sent to
    the hardware engine, rather than the host Huffman decoder on the CPU threads; small thumbnails keep the host
    decoder; unmeasured: bench_loader's row dermfast-dali-gpu-hht1M runs DALI's default beside it). All in
    ``decoder_options``, to override.
    ``num_threads`` defaults to this rank's cores, ``prefetch`` to 3 batches.
  * Output dtype: crop_mirror_normalize writes float32 or float16 directly. DALI 2.4 has no bfloat16 type, so
    ``output_dtype=torch.bfloat16`` has DALI write float16 (half the bytes of float32; normalised pixels lie in
    about [-2.2, 2.7], where fp16 holds more than bf16's 8 mantissa bits) and torch cast it on the GPU (within
    one bf16 rounding of a direct conversion).
  * File reading, ``parallel`` (default: on for the GPU pipeline over >= 8 batches of records): the callback (read
    bytes, parse the header, draw the parameters: on a CPU, ~6 us a header, ~0.3 ms the parameters of 128 images,
    plus the reads) then runs in ``py_workers`` processes (DALI's parallel external_source) instead of inside
    ``pipe.run()`` on the training thread, where it stalls kernel launches. The workers are started with ``spawn``
    (default ``py_start_method``): fork is impossible once CUDA is initialised in the process, and a forked child of
    a multi-threaded torch process can deadlock; spawn costs a few seconds once per loader (the workers import
    torch), which the build-once design pays once. For the CPU pipeline the default is off: decoding is the bound
    there, and the worker processes would take cores from DALI's decoder threads. None of this could be measured on
    a GPU while it was written (the machine had none): the settings follow DALI's documentation and the measurements
    in issue 6, and benchmarks/bench_loader.py measures them where a GPU is at hand.
  * Transfer to torch: with DALI's dynamic executor, outputs are reference-counted buffers that DALI does not
    reuse while a consumer holds them, so ``torch.from_dlpack`` is zero-copy and safe; a tensor from batch k is
    never overwritten by batch k+1. With the legacy executor the data is copied (``feed_ndarray``).
  * Decode failures: DALI's error ("Critical error in pipeline ... nvImageCodec failure") does not name the
    file. The loader re-raises a RuntimeError naming the epoch, the batch, the file(s) PIL cannot decode either,
    and the batch's files; that pipeline is thrown away and the next iteration builds a new one.
"""
from __future__ import annotations

import functools
import inspect
import os
import tempfile
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from dermfast._optional import DALI_REASON, HAS_DALI
from dermfast.data.augment import (Augment, as_transpose_flips, eval_geometry, image_size,
                                   sample_train_params)
from dermfast.data.loader_base import EpochPlan, cores_per_rank
from dermfast.data.records import ImageRecords

DALI_INSTALL_HINT = "uv pip install nvidia-dali-cuda130"
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
_DTYPES = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "FLOAT16"}  # bf16: fp16, cast
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


class _Plan:
    """Ring of plan slots, int64 [slots, 4]: (DALI epoch index, base epoch, base start position, stop iteration).

    DALI epoch j streams batches from epoch ``base epoch`` at ``base start`` on, then the following epochs from
    their starts, without end, until iteration ``stop`` (no stop: int64 max). The loader writes slot j before
    DALI epoch j starts and lowers ``stop`` to end it; the callback reads it. In-process it is a numpy array;
    ``shared=True`` backs it with a file (in /dev/shm where there is one) that worker processes map, so plans
    written after the workers started reach them.
    """

    SLOTS = 8
    NO_STOP = np.iinfo(np.int64).max

    def __init__(self, shared: bool):
        self.path = None
        if shared:
            fd, self.path = tempfile.mkstemp(prefix="dermfast-dali-plan-", suffix=".i64",
                                             dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            os.close(fd)
            self.table = np.memmap(self.path, dtype=np.int64, mode="w+", shape=(self.SLOTS, 4))
        else:
            self.table = np.zeros((self.SLOTS, 4), np.int64)
        self.table[:, 0] = -1

    def __getstate__(self):
        if self.path is None:
            raise RuntimeError("an in-process _Plan cannot be sent to another process (use shared=True)")
        return {"path": self.path}

    def __setstate__(self, state):
        self.path, self.table = state["path"], None  # mapped on first read, in the worker

    def write(self, j: int, epoch: int, start: int) -> None:
        row = self.table[j % self.SLOTS]
        row[0] = -1  # invalid while being rewritten
        row[1:] = (epoch, start, self.NO_STOP)
        row[0] = j

    def end_early(self, j: int, stop: int) -> None:
        """DALI epoch j ends at iteration `stop` (iterations already computed still come out)."""
        row = self.table[j % self.SLOTS]
        if row[0] == j:
            row[3] = min(int(row[3]), int(stop))

    def read(self, j: int) -> tuple[int, int, int]:
        if self.table is None:
            self.table = np.memmap(self.path, dtype=np.int64, mode="r", shape=(self.SLOTS, 4))
        tag, epoch, start, stop = (int(v) for v in self.table[j % self.SLOTS])
        if tag != j:
            raise RuntimeError(f"DaliLoader: no plan for DALI epoch {j} (slot holds {tag})")
        return epoch, start, stop

    def close(self) -> None:
        if self.path is not None:
            _unlink(self.path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _BatchSource:
    """external_source callback: iteration ``info.iteration`` of DALI epoch ``info.epoch_idx``, i.e. batch k of
    our epoch e, where the plan slot gives the stream's start (base epoch, base start) and epochs follow one
    another with `EpochPlan.num_batches` batches each.

    Plain picklable state (records, the epoch plan, the plan table, the recipe), no loader reference, so DALI's
    parallel mode can run it in worker processes. Returns encoded bytes, label, source, (epoch, position) per
    sample (the loader checks it) and, for training, the per-sample augmentation parameters (window anchor and
    shape, flip, jitter factors).
    """

    def __init__(self, records: ImageRecords, plan: EpochPlan, table: _Plan, train: bool, aug: Augment,
                 seed: int, rank: int):
        self.records, self.plan, self.table = records, plan, table
        self.train, self.aug, self.seed, self.rank = train, aug, seed, rank
        self._cursor = None  # (DALI epoch, epoch, start, its first iteration): iterations come in rising order

    def __setstate__(self, state):
        """Unpickled in a parallel-mode worker process: ignore SIGINT there. A terminal Ctrl-C signals the whole
        process group; the main process turns it into "finish the step, checkpoint" (the engine), so a worker
        must not die of it (the pipeline would fail instead). The main process still stops the workers."""
        self.__dict__.update(state)
        import multiprocessing
        import signal
        import threading
        if multiprocessing.parent_process() is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def locate(self, j: int, i: int) -> tuple[int, int, int]:
        """(epoch, start, k): DALI epoch j's iteration i is batch k of `epoch`'s iteration from `start`."""
        base_epoch, base_start, stop = self.table.read(j)
        if i >= stop:
            raise StopIteration
        cur = self._cursor
        if cur is None or cur[0] != j or i < cur[3]:
            cur = (j, base_epoch, base_start, 0)
        _, epoch, start, first = cur
        for _ in range(1_000_000):
            n = self.plan.num_batches(epoch, start)
            if i < first + n:
                self._cursor = (j, epoch, start, first)
                return epoch, start, i - first
            epoch, start, first = epoch + 1, 0, first + n
        raise RuntimeError(f"DaliLoader: no batch for iteration {i} within a million epochs (empty epochs?)")

    def __call__(self, info):
        epoch, start, k = self.locate(int(info.epoch_idx), int(info.iteration))
        lo, hi = self.plan.batch_rows(epoch, start, k)
        positions = np.arange(lo, hi)
        idx = self.plan.order(epoch)[positions]
        rec = self.records
        data = [rec.read_bytes(int(i)) for i in idx]
        where = np.stack([np.full(len(positions), epoch), positions], 1).astype(np.int64)
        out = [[np.frombuffer(d, dtype=np.uint8) for d in data], rec.labels[idx], rec.source[idx], where]
        sizes = np.array([_size_of(d, rec.paths[i]) for d, i in zip(data, idx)], np.int64).reshape(-1, 2)
        if rec.has_masks:  # encoded mask, or an all-zero PNG of the image's size where the image has none
            masks = [rec.read_mask_bytes(int(i)) for i in idx]
            out += [[np.frombuffer(m if m is not None else _blank_png(int(w), int(h)), dtype=np.uint8)
                     for m, (w, h) in zip(masks, sizes)],
                    np.array([m is not None for m in masks], np.uint8)]
        if self.train:
            p = sample_train_params(self.aug, self.seed, self.rank, epoch, positions, sizes[:, 0], sizes[:, 1])
            p["hue"] = p["hue"] * np.float32(360.0)  # turns -> degrees, fn.hsv's unit
            if _orients(self.aug):
                p["o_t"], p["o_h"], p["o_v"] = as_transpose_flips(p["flip"], p["vflip"], p["rot90"])
            out += [np.stack([p["x"], p["y"]], 1), np.stack([p["w"], p["h"]], 1)]
            out += [p[name] for name in _used_params(self.aug)]
        else:  # torchvision's resize + centre crop (augment.eval_geometry), per sample
            g = eval_geometry(self.aug, sizes[:, 0], sizes[:, 1])
            s = int(self.aug.size)
            out += [np.stack([g["new_h"], g["new_w"]], 1).astype(np.float32),
                    _crop_pos(g["left"], g["new_w"] - s), _crop_pos(g["top"], g["new_h"] - s)]
        return out


def _crop_pos(offset: np.ndarray, room: np.ndarray) -> np.ndarray:
    """crop_mirror_normalize's normalised window position for an integer offset: DALI's anchor is
    round(pos * room), so offset / room lands on the offset exactly (0.5 where there is no room)."""
    room_f = np.maximum(room, 1).astype(np.float64)
    return np.where(room > 0, offset / room_f, 0.5).astype(np.float32)


def _orients(aug: Augment) -> bool:
    """Vertical flips or quarter turns: the graph applies (transpose, hflip, vflip) instead of a mirror alone."""
    return aug.vflip > 0 or bool(aug.rot90)


def _used_params(aug: Augment) -> list[str]:
    """The per-sample parameters the training graph consumes besides the window (no unused source outputs)."""
    orient = _orients(aug)
    used = [("flip", aug.flip > 0 and not orient), ("o_t", orient), ("o_h", orient), ("o_v", orient),
            ("brightness", aug.brightness), ("contrast", aug.contrast), ("saturation", aug.saturation),
            ("hue", aug.hue)]
    return [name for name, on in used if on]


_INT_PARAMS = frozenset(("flip", "o_t", "o_h", "o_v"))


@functools.lru_cache(maxsize=64)
def _blank_png(width: int, height: int) -> bytes:
    """An all-zero 8-bit grey PNG: the mask of an image that has none (the batch still needs one)."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (width, height), 0).save(buf, format="PNG")
    return buf.getvalue()


def _size_of(data: bytes, path: str) -> tuple[int, int]:
    try:
        return image_size(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


class DaliLoader:
    """Iterable over batches {"image", "label", "source"}; each iteration is one epoch (see the module doc).

    records      ImageRecords (files or a store; read with ``read_bytes``).
    aug          the Augment recipe: train uses size/scale/ratio/flip/jitter/mean/std, eval size/crop_fraction.
    batch_size   the (maximum) batch size.
    train        random augmentation and drop_last by default; eval: every image once, in order (or in the
                 sampler's order when a sampler is given, e.g. a sharded eval).
    sampler      a BalancedSampler-like object (set_epoch, rank_indices (a pure function of the epoch), epoch,
                 rank, state_dict / load_state_dict); None: see `EpochOrder`.
    device       "gpu" (decode on the GPU with nvJPEG, tensors on cuda:device_id) or "cpu".
    device_id    CUDA device for "gpu" (default: torch's current device); ignored for "cpu".
    seed         augmentation seed (hashed with the sampler's rank, the epoch and the position).
    num_threads  DALI CPU worker threads (default: this rank's cores).
    output_dtype torch.float32, torch.float16 or torch.bfloat16 (bf16: DALI writes fp16, torch casts).
    drop_last    drop the epoch's last partial batch; None: train and the epoch holds >= batch_size samples.
    parallel     run the read callback in ``py_workers`` processes, started with ``py_start_method`` (default
                 "spawn"); default: on for "gpu" when the records hold at least 8 batches (starting the
                 processes costs seconds, more than reading a few batches on the training thread).
    prefetch     DALI prefetch queue depth (batches in flight), also the parallel source's queue depth.
    interp       "bicubic" or "bilinear".
    decoder_options  extra / overriding keyword arguments of the mixed (GPU) decoder, e.g. hw_decoder_load.
    """

    def __init__(self, records: ImageRecords, aug: Augment, batch_size: int, *, train: bool, sampler=None,
                 device: str = "gpu", device_id: int | None = None, seed: int = 0, num_threads: int | None = None,
                 output_dtype: torch.dtype = torch.float32, drop_last: bool | None = None,
                 parallel: bool | None = None, prefetch: int = 3, py_workers: int | None = None,
                 py_start_method: str = "spawn", interp: str = "bicubic", decoder_options: dict | None = None):
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
        cores = cores_per_rank()
        num_threads = cores if num_threads is None else int(num_threads)
        if parallel is None:  # worth its process start-up for the GPU pipeline over more than a few batches
            parallel = device == "gpu" and len(records) >= 8 * int(batch_size)
        parallel = bool(parallel)
        py_workers = (2 if cores >= 8 else 1) if py_workers is None else int(py_workers)
        if num_threads < 1 or prefetch < 1 or (parallel and py_workers < 1):
            raise ValueError("DaliLoader: num_threads, prefetch and py_workers must be >= 1")
        if py_start_method not in ("spawn", "fork"):
            raise ValueError(f"DaliLoader: py_start_method must be 'spawn' or 'fork', got {py_start_method!r}")
        if parallel and py_start_method == "fork" and torch.cuda.is_initialized():
            raise ValueError("DaliLoader: py_start_method='fork' is impossible once CUDA is initialised in this "
                             "process; use 'spawn' (the default)")
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
        self.records, self.aug, self.batch_size, self.train = records, aug, int(batch_size), bool(train)
        self.sampler, self.device, self.device_id, self.seed = sampler, device, device_id, int(seed)
        self.num_threads, self.output_dtype = num_threads, output_dtype
        self.parallel, self.prefetch, self.py_workers = parallel, int(prefetch), py_workers
        self.py_start_method, self.interp = py_start_method, interp
        self.decoder_options = dict(decoder_options or {})
        self.backend = f"dali-{device}"
        self.plan = EpochPlan(len(records), self.batch_size, train=self.train, sampler=sampler, seed=self.seed,
                              drop_last=drop_last)
        self.rank = self.plan.rank
        self.builds = 0          # pipelines built by this loader: 1 over any number of epochs unless one failed
        self.restarts = 0        # DALI epochs ended early (a jump, a resume or a break): drained, not rebuilt
        self._pipe = None
        self._table: _Plan | None = None
        self._j = 0              # the DALI epoch the pipeline is streaming
        self._taken = 0          # batches of DALI epoch _j taken out of the pipeline
        self._next = None        # (epoch, start, k): what the pipeline's next output is
        self._active = None      # token of the running epoch's iterator

    # --- epochs and state (EpochPlan) ---------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch the next iteration runs."""
        return self.plan.epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration run `epoch` (and move the sampler there); a pending resume is kept."""
        self.plan.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches in a full epoch (the next one; a resumed epoch yields fewer)."""
        return self.plan.num_batches(self.plan.epoch)

    @property
    def consumed(self) -> int:
        """Samples of the current epoch handed out so far (a resumed epoch's skipped ones included)."""
        return self.plan.state_dict()["position"]

    def state_dict(self) -> dict:
        """{"epoch", "position" (samples actually handed out, not DALI's prefetch), "seed", "sampler"}."""
        return self.plan.state_dict()

    def load_state_dict(self, state) -> None:
        """The next iteration continues `state`'s epoch from its position, with the same batches."""
        self.plan.load_state_dict(state)

    # --- pipeline ---------------------------------------------------------------------------------------
    def _decoder_kwargs(self) -> dict:
        if self.device != "gpu":
            return {}
        w = h = 0
        for i in range(min(16, len(self.records))):  # the largest of the first images sizes the buffers
            try:
                iw, ih = image_size(self.records.read_bytes(i))
            except (OSError, ValueError):
                continue
            w, h = max(w, iw), max(h, ih)
        pad = max(w * h * 3 * 5 // 4, 0)
        kw = {"hw_decoder_load": 0.99, "hybrid_huffman_threshold": 500_000,
              "device_memory_padding": max(16 << 20, pad), "host_memory_padding": max(8 << 20, pad)}
        if w and h:
            kw.update(preallocate_width_hint=w, preallocate_height_hint=h)
        kw.update(self.decoder_options)
        return kw

    def _build(self):
        dali, fn, types = self._dali
        aug, gpu, s = self.aug, self.device == "gpu", int(self.aug.size)
        interp = getattr(types, _INTERP[self.interp])
        self._table = _Plan(shared=self.parallel)
        weakref.finalize(self, self._table.close)
        source = _BatchSource(self.records, self.plan, self._table, self.train, aug, self.seed, self.rank)
        # The dynamic executor (DALI >= 2.0's default; asked for explicitly for older 1.x releases) is what makes
        # zero-copy DLPack outputs safe.
        dynamic = {"exec_dynamic": True} if "exec_dynamic" in inspect.signature(dali.Pipeline).parameters else {}
        pipe = dali.Pipeline(batch_size=self.batch_size, num_threads=self.num_threads,
                             device_id=self.device_id if gpu else None, seed=0,
                             prefetch_queue_depth=self.prefetch, py_num_workers=self.py_workers,
                             py_start_method=self.py_start_method, **dynamic)
        with pipe:
            extra = {"parallel": True, "prefetch_queue_depth": self.prefetch} if self.parallel else {}
            masks = self.records.has_masks
            dtypes, ndims = [types.UINT8, types.INT64, types.UINT8, types.INT64], [1, 0, 0, 1]
            if masks:
                dtypes, ndims = dtypes + [types.UINT8, types.UINT8], ndims + [1, 0]
            used = _used_params(aug) if self.train else []
            if self.train:
                dtypes += [types.INT32, types.INT32] + [types.INT32 if u in _INT_PARAMS else types.FLOAT
                                                        for u in used]
                ndims += [1, 1] + [0] * len(used)
            else:  # resized [h, w], crop_pos_x, crop_pos_y per sample
                dtypes += [types.FLOAT, types.FLOAT, types.FLOAT]
                ndims += [1, 0, 0]
            outs = list(fn.external_source(source=source, num_outputs=len(dtypes), batch=True, batch_info=True,
                                           dtype=dtypes, ndim=ndims, **extra))
            encoded, label, src, where = outs[:4]
            mask_enc, has_mask = outs[4:6] if masks else (None, None)
            rest = outs[6:] if masks else outs[4:]
            decoder = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB, "adjust_orientation": False,
                       **self._decoder_kwargs()}
            # Masks: decoded on the CPU (small grey PNGs), nearest neighbour, moved to the GPU once at S x S.
            mask_decoder = {"device": "cpu", "output_type": types.GRAY, "adjust_orientation": False}
            nearest = {"interp_type": types.INTERP_NN, "antialias": False}
            mask = None
            if self.train:
                anchor, shape = rest[:2]
                p = dict(zip(used, rest[2:]))
                img = fn.decoders.image_slice(encoded, anchor, shape, **decoder)
                img = fn.resize(img, size=[s, s], interp_type=interp, antialias=True)
                img = self._jitter(img, fn, types, gpu, p)
                if masks:
                    mask = fn.decoders.image_slice(mask_enc, anchor, shape, **mask_decoder)
                    mask = fn.resize(mask, size=[s, s], **nearest)
                    mask = mask.gpu() if gpu else mask
                if _orients(aug):
                    img, mask = (None if x is None else self._orient(x, fn, types, gpu, p) for x in (img, mask))
                    mirror = 0
                else:
                    mirror = p.get("flip", 0)
                    if mask is not None and "flip" in p:
                        mask = fn.flip(mask, horizontal=mirror, vertical=0)
                crop = {}
            else:
                resized, pos_x, pos_y = rest[:3]
                img = fn.decoders.image(encoded, **decoder)
                img = fn.resize(img, size=resized, interp_type=interp, antialias=True)
                mirror, crop = 0, {"crop": [s, s], "crop_pos_x": pos_x, "crop_pos_y": pos_y}
                if masks:
                    mask = fn.decoders.image(mask_enc, **mask_decoder)
                    mask = fn.resize(mask, size=resized, **nearest)
                    mask = fn.crop(mask, **crop)
                    mask = mask.gpu() if gpu else mask
            image = fn.crop_mirror_normalize(img, mirror=mirror, mean=[255.0 * m for m in aug.mean],
                                             std=[255.0 * v for v in aug.std],
                                             dtype=getattr(types, _DTYPES[self.output_dtype]),
                                             output_layout="CHW", **crop)
            if gpu:
                label, src = label.gpu(), src.gpu()
            extra_out = []
            if masks:  # HWC uint8 0 / 255 -> CHW float32 0 / 1
                mask = fn.cast(fn.transpose(mask, perm=[2, 0, 1]) > 127, dtype=types.FLOAT)
                extra_out = [mask, has_mask.gpu() if gpu else has_mask]
            pipe.set_outputs(image, label, src, where, *extra_out)  # `where` stays on the CPU: the loader checks it
        self._pipe, self._j, self._taken, self._next = pipe, 0, 0, None
        self.builds += 1
        return pipe

    @staticmethod
    def _orient(x, fn, types, gpu: bool, p: dict):
        """hflip, vflip and quarter turns as `augment.as_transpose_flips` writes them: per sample, the S x S image
        or its transpose, then flips. DALI 2.4 has no per-sample transpose switch (``perm`` is one value for the
        batch), so the choice is arithmetic, ``(1 - t) * x + t * x^T`` with t in {0, 1} (int32: uint8 x int32
        promotes to int32, no wrap-around as in a uint8 ``x^T - x``), cast back to uint8; a permutation of pixels,
        for image and mask alike."""
        t = p["o_t"].gpu() if gpu else p["o_t"]
        xt = fn.transpose(x, perm=[1, 0, 2], transpose_layout=False)
        x = fn.cast((1 - t) * x + t * xt, dtype=types.UINT8)
        return fn.flip(x, horizontal=p["o_h"], vertical=p["o_v"])

    def _jitter(self, img, fn, types, gpu: bool, p: dict):
        """Colour jitter with the per-sample factors `p` (source outputs, CPU): see the module doc."""
        if "brightness" in p or "contrast" in p:
            x = img
            if "contrast" in p:
                mean = fn.reductions.mean(img, axes=[0, 1])  # per-channel mean, [3]; on the GPU for "gpu"
                grey = mean[0] * _GREY[0] + mean[1] * _GREY[1] + mean[2] * _GREY[2]
                x = grey + (p["contrast"].gpu() if gpu else p["contrast"]) * (x - grey)
            if "brightness" in p:
                x = (p["brightness"].gpu() if gpu else p["brightness"]) * x
            img = fn.cast(x, dtype=types.UINT8)  # rounds and saturates, as brightness_contrast's uint8 output
        kw = {k: p[k] for k in ("saturation", "hue") if k in p}  # hue in degrees (converted by the source)
        return fn.hsv(img, **kw) if kw else img

    def _build_pipeline(self) -> None:
        try:
            self._pipe.build()  # starts the parallel source's worker processes
        except RuntimeError as e:
            if self.parallel and "initialization failed" in str(e).lower():
                raise RuntimeError(
                    f"DaliLoader: DALI's reader processes ({self.py_start_method}) did not start. With 'spawn' "
                    "they import the main module again: a script that builds the loader needs an "
                    "`if __name__ == '__main__':` guard, and the records' store must be picklable. "
                    "Or pass parallel=False.") from e
            raise

    def _release(self) -> None:
        # Dropping the last reference frees DALI's pipeline and stops its Python workers.
        self._pipe, self._taken, self._next = None, 0, None
        if self._table is not None:
            self._table.close()
            self._table = None

    def _start_dali_epoch(self, j: int, epoch: int, start: int) -> None:
        """Write DALI epoch j's plan: stream from `epoch` at `start` on (the pipeline is new or reset to j)."""
        self._table.write(j, epoch, start)
        self._j, self._taken, self._next = j, 0, (epoch, start, 0)

    def _drain(self) -> None:
        """End DALI epoch _j now: no batch beyond those already in flight, which are decoded and dropped."""
        self._table.end_early(self._j, self._taken)
        while True:
            try:
                self._pipe.run()
            except StopIteration:
                break
        self._pipe.reset()
        self.restarts += 1

    def _advance(self) -> None:
        epoch, start, k = self._next
        more = k + 1 < self.plan.num_batches(epoch, start)
        self._next = (epoch, start, k + 1) if more else (epoch + 1, 0, 0)

    # --- iteration --------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        self._active = None  # a previous epoch's iterator, if still open, is superseded
        epoch, start, batches = self.plan.begin()
        token = object()
        self._active = token
        if batches == 0:  # nothing left in this epoch (resumed at its end): DALI is not asked for anything
            self.plan.finish()
            return iter(())
        try:
            if self._pipe is None:
                self._build()
                self._start_dali_epoch(0, epoch, start)
                self._build_pipeline()
            elif self._next != (epoch, start, 0):
                # The pipeline streams something else (the epoch after the last one run, or the rest of an epoch
                # left early): end that DALI epoch, drop what is in flight, stream from here.
                self._table.write(self._j + 1, epoch, start)
                self._drain()
                self._start_dali_epoch(self._j + 1, epoch, start)
        except Exception:
            self._release()
            raise
        return self._run(token, epoch, start, batches)

    def _run(self, token, epoch: int, start: int, batches: int) -> Iterator[dict]:
        pipe, done = self._pipe, False
        try:
            for k in range(batches):
                if self._active is not token:
                    raise RuntimeError("DaliLoader: this epoch's iterator was superseded by a newer "
                                       "iter(loader); iterate one epoch at a time")
                try:
                    outs = pipe.run()
                except StopIteration:
                    raise RuntimeError(f"DaliLoader: DALI ended epoch {epoch} after {k} of {batches} batches") \
                        from None
                except RuntimeError as e:
                    raise self._decode_error(e, epoch, start, k) from e
                self._taken += 1
                lo, hi = self.plan.batch_rows(epoch, start, k)
                got = tuple(int(v) for v in outs[3].at(0))
                if got != (epoch, lo) or len(outs[3]) != hi - lo:
                    raise RuntimeError(f"DaliLoader: DALI delivered (epoch, position) {got} x {len(outs[3])} where "
                                       f"({epoch}, {lo}) x {hi - lo} was due: a plan mismatch (a bug)")
                self._advance()
                batch = self._to_torch(pipe, outs[:3] + outs[4:])
                self.plan.advance(hi - lo)
                yield batch
            # Done. The pipeline already decodes the next epoch's first batches (the stream goes on), which is
            # what the next iteration asks for unless the caller moves elsewhere.
            self.plan.finish()
            done = True
        except Exception:
            if self._pipe is pipe:  # a failed pipeline is never reused
                self._release()
            raise
        finally:
            if not done and self._active is token:  # left early (break), or failed
                self.plan.finish()
                if self._pipe is pipe and self._table is not None:
                    self._table.end_early(self._j, self._taken)  # drained by the next iteration

    def _to_torch(self, pipe, outs) -> dict:
        image, label, src, *mask = (self._tensor(pipe, o) for o in outs)
        if self.output_dtype is torch.bfloat16:
            image = image.to(torch.bfloat16)
        out = {"image": image, "label": label, "source": src}
        if mask:
            out["mask"], out["has_mask"] = mask
        return out

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

    def _decode_error(self, err: Exception, epoch: int, start: int, k: int) -> RuntimeError:
        """DALI's error names no file: find the batch's files that PIL cannot decode either, name them all.
        The pipeline is thrown away (the next iteration builds a new one)."""
        self._release()
        lo, hi = self.plan.batch_rows(epoch, start, k)
        idx = self.plan.order(epoch)[lo:hi]
        rec = self.records
        paths = [rec.paths[i] for i in idx]
        bad = []
        for i in idx:
            reason = _pil_decode_error(rec, int(i))
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
