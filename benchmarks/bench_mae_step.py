"""End-to-end MAE pretraining step (forward + backward + AdamW): images/s, MFU, peak memory, where the time goes.

Variants, per preset (vit_b16, vit_l16, vit_h14), each at the largest batch that fits (descending candidates,
an OOM moves to the next):
  official                     the MAE recipe as facebookresearch/mae writes it, written out below (`OfficialMAE`):
                               timm blocks (SDPA), bf16 autocast, masking by torch.rand + argsort + gather, the
                               loss on every patch then masked, torch AdamW (default foreach implementation)
  official+compile             the same under torch.compile
  dermfast                     dermfast.models.mae.MaskedAutoencoderViT with every kernel on (automatic backend
                               choice), dermfast.train.optim.build_optimizer (fused AdamW, or apex FusedAdam)
  dermfast+compile             the same under torch.compile
  dermfast+compile+cudagraphs  torch.compile(mode="reduce-overhead"): CUDA graphs for the model's fwd / bwd (the
                               mask key `step` is held at 0: graphs would re-record for every new Python int)
  dermfast+dali                (opt-in) dermfast fed by the DALI GPU loader (dali-cpu on a CPU) decoding 1024x768
                               JPEGs (toy renders, written once to the cache) with random resized crop and flip
                               every step: the data path's cost shows as the difference to `dermfast`

Order: every eager variant on every preset first, then the compiled ones (each from the batch its eager form
fitted), so a time budget cuts the least telling cases.

Per row: median step time (CUDA events per step, after warm-up), images/s, TFLOP/s from the model FLOPs
(torch.utils.flop_counter on the official recipe, fwd + bwd, counted once on the meta device: the same useful
work for every variant, so a variant that skips work shows as faster, not as fewer FLOPs), MFU against the
measured bf16 matmul ceiling (`frac_of_ceiling`, filled by the harness) and against the datasheet dense bf16
peak (`mfu_datasheet`), peak memory (max allocated, absolute), and a step-time breakdown by kernel group from
torch.profiler (`breakdown_ms`; on a GPU, device time per kernel, the gap to the step time as `host/idle`).
Kernels replayed from a CUDA graph are grouped by their own names only (no enclosing ops are seen).

Settings (environment, read once per run): DERMFAST_BENCH_MAE_PRESETS (comma list), DERMFAST_BENCH_MAE_VARIANTS
(comma list), DERMFAST_BENCH_MAE_BATCHES (descending candidates for every preset), DERMFAST_BENCH_MAE_STEPS
(timed steps), DERMFAST_BENCH_MAE_BUDGET_S (wall-clock budget: cases past it are reported as skipped).
On a CPU (`--quick`): the demo preset at batch 2, two timed steps per variant, torch.compile with the `eager`
backend (dynamo capture only); CPU numbers are not performance results.
"""
from __future__ import annotations

import gc
import os
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import absent, error_row, main, markdown_table, on_gpu, row, summarize_ms  # noqa: E402

from dermfast.models.mae import MaskedAutoencoderViT, get_preset, sincos_pos_embed_2d  # noqa: E402

BENCH = "mae_step"
VARIANTS = ("official", "official+compile", "dermfast", "dermfast+compile", "dermfast+compile+cudagraphs",
            "dermfast+dali")
DEFAULT_VARIANTS = ("official", "dermfast", "dermfast+compile", "official+compile", "dermfast+compile+cudagraphs")
GPU_BATCHES = {"vit_b16": (1024, 512, 256, 128, 64), "vit_l16": (512, 256, 128, 64, 32),
               "vit_h14": (512, 256, 128, 64, 32)}
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s; first matching name wins.
DATASHEET_BF16 = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 NVL", 835.5), ("H100 PCIe", 756.5),
                  ("H100", 989.4), ("A100", 312.0))
GROUPS = ("matmul", "attention", "norm", "elementwise/casts", "optimiser", "masking", "loss", "other")
# Context rules see the kernel and every enclosing op / annotation; kind rules the kernel and its nearest ops.
_CONTEXT = (("optimiser", re.compile(r"optimizer\.step|adam|multi_tensor|_foreach_|zero_grad")),
            ("masking", re.compile(r"masking|argsort|aten::sort|radix|gather|scatter")),
            ("loss", re.compile(r"mae_loss|mse_loss|\bloss\b")))
_KIND = (("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product|softmax")),
         ("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|wgmma|aten::(mm|addmm|bmm|matmul|linear|"
                               r"convolution|_convolution|conv2d)\b|triton_tem_fused_mm|conv")),
         ("norm", re.compile(r"layer_?norm|norm")))
_ELEMENTWISE = re.compile(r"elementwise|copy|cast|fill|memset|memcpy|reduce|gelu|index|cat\b|where")
_RUNTIME = re.compile(r"^(cuda|cu)[A-Z]")
_UNATTRIBUTED = re.compile(r"^(profilerstep|cudagraph|cuda_graph|torch-compiled region|compiledfunction)")


# --------------------------------------------------------------------------------------------------------------
# (a) the official recipe, written out (facebookresearch/mae models_mae.py), with timm blocks
# --------------------------------------------------------------------------------------------------------------
class OfficialMAE(nn.Module):
    """facebookresearch/mae `MaskedAutoencoderViT`: forward(imgs [B, C, H, W]) -> (loss, pred, mask 0 keep 1 remove)."""

    def __init__(self, cfg):
        super().__init__()
        from timm.layers import PatchEmbed
        from timm.models.vision_transformer import Block

        self.p, self.ratio, self.norm_pix = cfg.patch_size, cfg.mask_ratio, cfg.norm_pix_loss
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        grid = cfg.img_size // cfg.patch_size
        zero = torch.zeros(1, 1, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.embed_dim) * 0.02)
        self.register_buffer("pos_embed", torch.cat([zero, sincos_pos_embed_2d(cfg.embed_dim, grid)[None]], 1))
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, qkv_bias=True)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, cfg.decoder_embed_dim) * 0.02)
        dzero = torch.zeros(1, 1, cfg.decoder_embed_dim)
        self.register_buffer("decoder_pos_embed",
                             torch.cat([dzero, sincos_pos_embed_2d(cfg.decoder_embed_dim, grid)[None]], 1))
        self.decoder_blocks = nn.ModuleList(Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio,
                                                  qkv_bias=True) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size ** 2 * cfg.in_chans)

    def random_masking(self, x, mask_ratio):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        noise = torch.rand(N, L, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        return x_masked, torch.gather(mask, dim=1, index=ids_restore), ids_restore

    def patchify(self, imgs):
        p, n = self.p, imgs.shape[0]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(n, imgs.shape[1], h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, h * w, p * p * imgs.shape[1])

    def forward(self, imgs):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        with torch.profiler.record_function("masking"):
            x, mask, ids_restore = self.random_masking(x, self.ratio)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        with torch.profiler.record_function("masking"):
            tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
            x_ = torch.cat([x[:, 1:, :], tokens], dim=1)
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        with torch.profiler.record_function("loss"):
            target = self.patchify(imgs)
            if self.norm_pix:
                mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
                target = (target - mean) / (var + 1.0e-6) ** 0.5
            loss = ((pred - target) ** 2).mean(dim=-1)  # every patch ...
            loss = (loss * mask).sum() / mask.sum()     # ... then only the removed ones
        return loss, pred, mask


def _decay_groups(model: nn.Module, weight_decay: float = 0.05) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") or "token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------------------
# FLOPs, datasheet peaks, profiler grouping
# --------------------------------------------------------------------------------------------------------------
def flops_per_image(cfg) -> float:
    """Model FLOPs of one image's fwd + bwd (official recipe, flop_counter on the meta device: no memory, any host)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = OfficialMAE(cfg)
        imgs = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    counter = FlopCounterMode(display=False)
    with counter:
        model(imgs)[0].backward()
    return counter.get_total_flops() / 2


def datasheet_peak(device_name: str) -> tuple[str, float] | None:
    for key, tflops in DATASHEET_BF16:
        if key.lower() in device_name.lower():
            return key, tflops
    return None


def classify(names: list[str]) -> str:
    """Kernel group of one kernel (or CPU op) `names[0]`, given its enclosing ops `names[1:]` (innermost first).

    Context first (inside the optimiser step, the masking, the loss: anything there belongs to it), then what
    the kernel itself is, then what its nearest ops are (a cuBLAS kernel with an opaque name under aten::mm).
    """
    chain = [n.lower() for n in names]
    for group, rx in _CONTEXT:
        if any(rx.search(n) for n in chain):
            return group
    for group, rx in _KIND:
        if rx.search(chain[0]):
            return group
    if _ELEMENTWISE.search(chain[0]):
        return "elementwise/casts"
    for group, rx in _KIND:
        if any(rx.search(n) for n in chain[1:3]):
            return group
    if _UNATTRIBUTED.search(chain[0]):
        return "other"
    return "elementwise/casts"


def _ancestry(evt) -> list[str]:
    """Names of evt and its enclosing CPU ops, innermost first, CUDA runtime calls (cudaLaunchKernel) left out."""
    names = []
    while evt is not None:
        if not _RUNTIME.match(evt.name):
            names.append(evt.name)
        evt = evt.cpu_parent
    return names


def breakdown(prof, steps: int, gpu: bool) -> dict[str, float]:
    """ms per step per kernel group: device kernel time on a GPU, CPU self time on a CPU."""
    out = dict.fromkeys(GROUPS, 0.0)
    for evt in prof.events():
        if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CPU:
            continue
        if gpu:
            for k in evt.kernels:
                out[classify([k.name, *_ancestry(evt)])] += k.duration / 1e3 / steps
        elif not evt.name.startswith("ProfilerStep"):
            out[classify(_ancestry(evt))] += evt.self_cpu_time_total / 1e3 / steps
    return out


# --------------------------------------------------------------------------------------------------------------
# one variant: build, find the batch, time, profile
# --------------------------------------------------------------------------------------------------------------
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free() -> None:
    gc.collect()
    if on_gpu():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Case:
    """A model, its optimiser and a step function for one variant on one preset."""

    def __init__(self, variant: str, cfg, device: torch.device):
        self.variant, self.cfg, self.device = variant, cfg, device
        self.gpu = device.type == "cuda"
        self.loader = None
        self.official = variant.startswith("official")
        with device:
            self.model = (OfficialMAE(cfg) if variant.startswith("official") else MaskedAutoencoderViT(cfg)).to(device)
        lr = cfg.blr
        if variant.startswith("official"):
            self.opt = torch.optim.AdamW(_decay_groups(self.model), lr=lr, betas=(0.9, 0.95))
            self.opt_name = "torch.AdamW(default)"
        else:
            self.opt, self.opt_name = dermfast_optimizer(self.model, lr, device)
        self.forward = self.model
        self.compile_mode = None
        if "+compile" in variant:
            if self.gpu:
                self.compile_mode = "reduce-overhead" if "cudagraphs" in variant else "default"
                self.forward = torch.compile(self.model, mode=self.compile_mode)
            else:  # CPU --quick: dynamo capture only; inductor's C++ build would take minutes on a small CPU
                self.compile_mode = "backend=eager"
                self.forward = torch.compile(self.model, backend="eager")
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if self.gpu else nullcontext

    def use_dali(self, batch: int, steps: int) -> None:
        from dermfast.data.augment import Augment
        from dermfast.data.loader import build_loader
        records = _dali_records(batch * 2)
        self.loader = build_loader(records, Augment(size=self.cfg.img_size), batch, train=True,
                                   loader="dali-gpu" if self.gpu else "dali-cpu", device=self.device, seed=0,
                                   workers=min(8, os.cpu_count() or 1))
        self._it = iter(self.loader)

    def images(self, i: int, pool: list[torch.Tensor]) -> torch.Tensor:
        if self.loader is None:
            return pool[i % len(pool)]
        try:
            return next(self._it)["image"]
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)["image"]

    def step(self, imgs: torch.Tensor, i: int) -> None:
        if self.compile_mode == "reduce-overhead":
            # CUDA graphs would re-record for every new Python int: the mask key stays fixed (same work per step)
            i = 0
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast():  # dermfast's masks are keyed by (seed, step); the official recipe draws torch.rand
            loss = (self.forward(imgs) if self.official else self.forward(imgs, seed=0, step=i))[0]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def dermfast_optimizer(model: nn.Module, lr: float, device: torch.device):
    """The optimiser dermfast trains with (dermfast.train.optim: apex FusedAdam on CUDA when importable, else
    torch fused AdamW). If that module's API moved, torch fused AdamW, and the name says so."""
    try:
        from dermfast.train.optim import build_optimizer, param_groups
        return build_optimizer(param_groups(model, 0.05), lr, (0.9, 0.95), "auto", device)
    except (ImportError, TypeError) as e:
        opt = torch.optim.AdamW(_decay_groups(model), lr=lr, betas=(0.9, 0.95), fused=True)
        return opt, f"torch.AdamW(fused) (dermfast.train.optim unusable: {type(e).__name__}: {e})"


def _dali_records(n: int, unique: int = 64):
    """n records over min(n, unique) full-size (1024 x 768, quality 90, sensor noise) JPEGs of the embedded toy
    renderer, written once to the cache; files repeat past `unique` (decode cost per image is what counts)."""
    import numpy as np
    from PIL import Image

    from dermfast.data.records import ImageRecords
    from dermfast.data.toy import CLASSES, default_cache_dir, render_lesion

    root = default_cache_dir() / "bench-mae-step-1024x768"
    root.mkdir(parents=True, exist_ok=True)
    k = min(n, unique)
    paths = []
    for i in range(k):
        path = root / f"f{i:05d}.jpg"
        if not path.is_file():
            rng = np.random.default_rng([7, i])
            img = Image.fromarray(render_lesion(rng, CLASSES[i % len(CLASSES)], 384)).resize((1024, 768))
            arr = np.asarray(img).astype(np.int16) + rng.integers(-6, 7, (768, 1024, 3), dtype=np.int16)
            tmp = path.with_suffix(".tmp.jpg")
            Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(tmp, quality=90)
            os.replace(tmp, path)
        paths.append(str(path))
    idx = [i % k for i in range(n)]
    return ImageRecords([paths[i] for i in idx], np.array([i % len(CLASSES) for i in idx]), list(CLASSES),
                        root=str(root))


def _time_steps(case: Case, pool, start: int, n: int) -> list[float]:
    if not case.gpu:
        times = []
        for i in range(start, start + n):
            t = time.perf_counter()
            case.step(case.images(i, pool), i)
            times.append((time.perf_counter() - t) * 1e3)
        return times
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for j, (a, b) in enumerate(evs):
        imgs = case.images(start + j, pool)
        a.record()
        case.step(imgs, start + j)
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in evs]


def measure_case(case: Case, batch: int, steps: int, warmup: int, profile_steps: int) -> dict:
    """Warm up (compiles), time `steps` steps, then profile `profile_steps` more. Raises on OOM."""
    cfg, dev = case.cfg, case.device
    if case.variant == "dermfast+dali":
        case.use_dali(batch, steps)
    g = torch.Generator(device=dev).manual_seed(0)
    pool = [torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=dev, generator=g) for _ in range(2)]
    t = time.perf_counter()
    for i in range(warmup):
        case.step(case.images(i, pool), i)
    if case.gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t
    times = _time_steps(case, pool, warmup, steps)
    peak = torch.cuda.max_memory_allocated() / 2**20 if case.gpu else None
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.gpu else [])
    with profile(activities=acts) as prof:
        _time_steps(case, pool, warmup + steps, profile_steps)
    return {"timing": summarize_ms(times), "peak": peak, "warm_s": warm_s,
            "breakdown": breakdown(prof, profile_steps, case.gpu)}


def run_variant(variant: str, preset: str, batches: list[int], steps: int, warmup: int, profile_steps: int,
                device: torch.device) -> tuple[int, dict | None, str]:
    """(batch, result, why) at the largest batch of `batches` that fits; result None with why if none did.

    The result carries the optimiser's and compile mode's names. Any failure but an OOM on a GPU is raised."""
    case = Case(variant, get_preset(preset), device)
    why = "no batch size given"
    try:
        for b in batches:
            try:
                res = measure_case(case, b, steps, warmup, profile_steps)
                res.update(optimizer=case.opt_name, compile=case.compile_mode or "eager")
                return b, res, ""
            except Exception as e:  # noqa: BLE001  (OOM: the next smaller batch; anything else: raised)
                if not (case.gpu and _is_oom(e)):
                    raise
                why = f"out of memory at every batch down to {b}"
            case.opt.zero_grad(set_to_none=True)  # outside the except block: its traceback holds tensors
            case.loader = None
            _free()
        return 0, None, why
    finally:
        del case
        _free()


def _env_list(name: str, default):
    raw = os.environ.get(name, "").strip()
    return [s.strip() for s in raw.split(",") if s.strip()] if raw else list(default)


def cases(presets: list[str], variants: list[str]) -> list[tuple[str, str]]:
    """Run order, most telling first, so a time budget cuts the least: every eager variant on every preset, then
    the compiled ones (each starts from the batch its eager form fitted)."""
    eager = [(p, v) for v in variants if "+compile" not in v for p in presets]
    return eager + [(p, v) for p in presets for v in variants if "+compile" in v]


def dispatch_summary(device: torch.device, dtype: torch.dtype) -> str:
    """Which backend dermfast's automatic choice gives each op for (device, dtype), e.g. "mae_loss=triton ..."
    (sizes unknown here: a backend that refuses some sizes may still fall back inside the step)."""
    from dermfast.ops.registry import Query, ops
    out = []
    for name, op in sorted(ops().items()):
        try:
            out.append(f"{name}={op.select(Query(device, dtype, {})).backend}")
        except Exception as e:  # noqa: BLE001  (an explicit DERMFAST_BACKEND that cannot serve: say so)
            out.append(f"{name}=none({type(e).__name__})")
    return " ".join(out)


def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from torch._dynamo's counters."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def run(quick: bool = False) -> list[dict]:
    rows: list[dict] = []
    try:
        _run(quick, rows)
    except BaseException as e:  # interrupted (the harness's SIGTERM, Ctrl-C): hand back what was measured
        e.partial_rows = rows
        raise
    _fill_throughput_ratios(rows)
    return rows


def _run(quick: bool, rows: list[dict]) -> None:
    gpu = on_gpu()
    device = torch.device("cuda" if gpu else "cpu")
    presets = _env_list("DERMFAST_BENCH_MAE_PRESETS", (["vit_b16"] if quick else ["vit_h14", "vit_l16", "vit_b16"])
                        if gpu else ["demo"])
    variants = _env_list("DERMFAST_BENCH_MAE_VARIANTS",
                         (["official", "dermfast"] if quick and gpu else DEFAULT_VARIANTS))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"DERMFAST_BENCH_MAE_VARIANTS: unknown {unknown}; accepted: {', '.join(VARIANTS)}")
    batches_env = [int(b) for b in _env_list("DERMFAST_BENCH_MAE_BATCHES", [])]
    steps = int(os.environ.get("DERMFAST_BENCH_MAE_STEPS", "0")) or (10 if gpu and not quick else
                                                                     5 if gpu else 2)
    budget = float(os.environ.get("DERMFAST_BENCH_MAE_BUDGET_S", "0")) or None
    profile_steps = 2 if gpu else 1
    dtype = "bf16-autocast" if gpu else "float32"
    ds = datasheet_peak(torch.cuda.get_device_name()) if gpu else None
    start = time.perf_counter()
    fpi = {p: flops_per_image(get_preset(p)) for p in presets}
    fitted: dict[tuple[str, str], int] = {}
    for preset, variant in cases(presets, variants):
        cfg = get_preset(preset)
        eager = variant.split("+compile")[0]
        if not gpu:
            cands = [2]
        else:
            cands = batches_env or ([64] if quick else list(GPU_BATCHES.get(preset, (256, 128, 64, 32))))
        if variant != eager and (preset, eager) in fitted:  # compiled: start where its eager form fitted
            cands = [b for b in cands if b <= fitted[preset, eager]] or cands[-1:]
        workload, shape = f"mae step {preset}", f"{cfg.in_chans}x{cfg.img_size}x{cfg.img_size}/p{cfg.patch_size}"
        if variant == "dermfast+compile+cudagraphs" and not gpu:
            rows.append(absent(BENCH, workload, shape, dtype, variant, "step", "needs a CUDA GPU"))
            continue
        if variant == "dermfast+dali":
            from dermfast import _optional
            if not _optional.HAS_DALI:
                rows.append(absent(BENCH, workload, shape, dtype, variant, "step", _optional.DALI_REASON))
                continue
        if budget and time.perf_counter() - start > budget:
            rows.append(row(BENCH, workload, shape, dtype, variant, "step",
                            status=f"skipped: past the {budget:.0f} s budget (DERMFAST_BENCH_MAE_BUDGET_S)"))
            continue
        print(f"  mae_step: {preset} {variant} (batches {cands}) ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        graphs0, breaks0 = _dynamo_counts()
        try:
            warmup = (4 if "+compile" in variant else 3) if gpu else (2 if "+compile" in variant else 1)
            b, res, why = run_variant(variant, preset, cands, steps, warmup, profile_steps, device)
        except Exception as e:  # noqa: BLE001  (one variant failing must not hide the others)
            rows.append(error_row(BENCH, f"{type(e).__name__}: {e}", workload=workload, shape=shape,
                                  dtype=dtype, impl=variant, pass_="step"))
            _free()
            continue
        finally:
            graphs1, breaks1 = _dynamo_counts()
            if "+compile" in variant:
                torch._dynamo.reset()  # the next model must not count against this one's recompile limit
        if res is None:
            rows.append(error_row(BENCH, why, workload=workload, shape=shape, dtype=dtype, impl=variant,
                                  pass_="step"))
            continue
        fitted[preset, variant] = b
        med = res["timing"]["median_ms"]
        tflops = fpi[preset] * b / med / 1e9
        extra = {"batch": b, "images_per_s": f"{b / med * 1e3:.1f}", "gflops_per_image": f"{fpi[preset] / 1e9:.2f}",
                 "optimizer": res["optimizer"], "compile": res["compile"],
                 "dynamo_graphs": graphs1 - graphs0, "graph_breaks": breaks1 - breaks0,
                 "warmup_s": f"{res['warm_s']:.1f}", "wall_s": f"{time.perf_counter() - t:.1f}",
                 "breakdown_ms": ";".join(f"{k}={v:.3f}" for k, v in res["breakdown"].items()),
                 "datasheet": f"{ds[0]} {ds[1]}" if ds else ""}
        if variant.startswith("dermfast"):
            extra["backends"] = dispatch_summary(device, torch.bfloat16 if gpu else torch.float32)
        if gpu:
            kernel_ms = sum(res["breakdown"].values())
            extra["breakdown_ms"] += f";host/idle={max(0.0, med - kernel_ms):.3f}"
            extra["mfu_datasheet"] = f"{tflops / ds[1]:.3f}" if ds else "n/a: no datasheet entry"
        rows.append(row(BENCH, workload, f"b{b} {shape}", dtype, variant, "step", res["timing"],
                        flops=fpi[preset] * b, peak=res["peak"], extra=extra,
                        note="; ".join(n for n in ("" if gpu else "CPU: not a performance result",
                                                   "mask key step held at 0 (CUDA graphs)" if "cudagraphs" in
                                                   variant else "") if n)))


def _fill_throughput_ratios(rows: list[dict]) -> None:
    """ratio_to_best_peer by images/s within a preset (variants may run at different batch sizes)."""
    by_preset: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            by_preset.setdefault(r["workload"], []).append(r)
    for group in by_preset.values():
        peers = [float(r["images_per_s"]) for r in group if not r["impl"].startswith("dermfast")]
        for r in group:
            if r["impl"].startswith("dermfast") and peers:
                r["ratio_to_best_peer"] = f"{float(r['images_per_s']) / max(peers):.2f}"


def summary(rows: list[dict]) -> str:
    """Markdown: img/s, MFU (measured ceiling and datasheet), memory, and the breakdown in % of the step."""
    ok = sorted((r for r in rows if r.get("status") == "ok" and r.get("images_per_s")),
                key=lambda r: (r["workload"], VARIANTS.index(r["impl"]) if r["impl"] in VARIANTS else 99))
    out = ["## MAE step (fwd + bwd + AdamW)", ""]
    if not on_gpu():
        out += ["CPU run: proves the benchmark works; not a performance result.", ""]
    table = []
    for r in ok:
        parts = dict(kv.split("=") for kv in r["breakdown_ms"].split(";") if "=" in kv)
        total = sum(float(v) for v in parts.values()) or 1.0  # on a GPU kernels + host/idle = the step
        peak = f"{float(r['peak_mib']) / 1024:.1f}" if r.get("peak_mib") else ""
        table.append({"preset": r["workload"].removeprefix("mae step "), "batch": r["batch"], "variant": r["impl"],
                      "img/s": r["images_per_s"], "TFLOP/s": r["tflops"],
                      "MFU measured": r.get("frac_of_ceiling", ""), "MFU datasheet": r.get("mfu_datasheet", ""),
                      "x best peer": r.get("ratio_to_best_peer", ""), "peak GiB": peak,
                      "breakdown % of step": " ".join(f"{k} {100 * float(v) / total:.0f}" for k, v in parts.items()
                                                      if float(v) > 0)})
    if table:
        out += [markdown_table(table, list(table[0])), "",
                "img/s and TFLOP/s from the median step; MFU measured = TFLOP/s over this run's bf16 matmul ceiling; "
                "x best peer = img/s over the best official variant's on that preset; model FLOPs (official "
                "recipe, flop_counter) credited to every variant.", ""]
        backends = next((r["backends"] for r in ok if r.get("backends")), "")
        if backends:
            out.append(f"- dermfast dispatch: {backends}")
    others = [r for r in rows if r.get("status") != "ok"]
    out += [f"- {r['workload']} {r['impl']}: {r['status']}" for r in others]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main(run))
