"""The training engine every stage runs on: `train(StageClass, cfg)`.

A stage (dermfast.train.stages.Stage) builds its model and loader and turns a batch into a loss; the engine
owns the rest:
- devices and processes: cuda:LOCAL_RANK under torchrun (NCCL; gloo on CPU), DDP or FSDP2, activation
  checkpointing, bf16 autocast on CUDA, one thread budget (torch threads + loader threads <= cores);
- the step: gradient accumulation (no all-reduce on accumulation micro-steps), global grad-norm (logged,
  clipped with --clip-grad), a non-finite loss or gradient skips the step (counted; the run stops after
  --max-bad-steps in a row), AdamW (torch fused, or apex), warmup + cosine lr set from the step number;
- the run folder: refuses to overwrite another run, run.json (status), config.yaml (resolved), log.csv,
  eval.csv, TensorBoard, plots.png, checkpoints (checkpoint.py) every --checkpoint-every steps and at epoch
  ends, exact resume (--resume PATH | auto), SIGTERM / Ctrl-C: finish the step, checkpoint, exit 143 / 130.
Host syncs: none in a steady-state step. A non-finite loss or gradient is decided on the device and skips the
step inside torch's fused AdamW (its `found_inf` input, as GradScaler uses it); the skip / bad-in-row counters
live on the device and are read at check points (log points, checkpoints, the last step; so a diverged run
stops at the first log point after --max-bad-steps bad steps in a row), where ranks also agree on a stop signal
(under torchrun also every min(--log-every, 10) steps; one process reads its own signal flag every step, for
free). Two cases read the skip flag every step, and say so at the start: an optimiser without `found_inf`
(apex FusedAdam) and a stage with an `after_step` hook (it runs after applied steps only).
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from dermfast.train import checkpoint as ckpt
from dermfast.train import distributed as dist
from dermfast.train.config import ConfigError, config_dict, save_config
from dermfast.train.context import Run
from dermfast.train.distributed import World, resolve_device, world_from_env
from dermfast.train.logs import CSVLog, TensorBoard, fmt
from dermfast.train.optim import build_optimizer, clip_grads_, param_groups, set_lr, warmup_cosine
from dermfast.train.preflight import (NothingToDo, Signals, check_out, check_out_path, resume_command, resume_point,
                                      resume_threads, thread_budget)
from dermfast.train.runlock import RunLock, RunLocked
from dermfast.train.stages import Stage

ENGINE_FILES = ("run.json", "config.yaml", "log.csv", "eval.csv", "plots.png", "checkpoint.safetensors",
                "best.safetensors", "checkpoints", "tensorboard")


class TrainingError(RuntimeError):
    """A run that failed while training (diverged, out of memory): one line for the CLI, exit code 1."""


class Interrupted(Exception):
    """SIGINT / SIGTERM: the step was finished and a checkpoint written; `exit_code` is 130 / 143."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# --compile: int keyword arguments of the model's forward that change every call (MAE's masking key `step`).
# dynamo traces them as SymInts from the first call; L['kwargs'][...] is the name under a DDP-wrapped forward.
COMPILE_DYNAMIC_INTS = ("step",)


def _dynamic_sources() -> str:
    return ",".join(f"L['{n}'],L['kwargs']['{n}']" for n in COMPILE_DYNAMIC_INTS)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------------------- train
def train(stage_cls: type[Stage], cfg, argv: list[str] | None = None) -> Path:
    """Run a stage end to end; returns the run folder. Raises ConfigError (bad input, nothing written),
    TrainingError, Interrupted."""
    world = world_from_env()
    try:
        device = resolve_device(cfg.device, world)
    except ValueError as e:
        raise ConfigError(f"bad --device {cfg.device!r}: {e}") from None
    stage = stage_cls()
    cfg = stage.resolve(cfg, world)
    cfg.validate()
    if cfg.precision == "bf16" and device.type != "cuda":
        raise ConfigError("--precision bf16 needs a CUDA device (CPU runs in fp32)")
    run_dir = Path(cfg.out).expanduser()
    created = not run_dir.exists()
    lock = RunLock(run_dir)
    if world.is_main:  # first: of two runs into one folder, the first to get here runs, the other is refused
        check_out_path(run_dir)
        try:
            lock.acquire()
        except RunLocked as e:
            raise ConfigError(str(e)) from None
    try:
        if not stage.trains(cfg):
            if world.world_size > 1:
                raise ConfigError(f"this {stage.name} run trains nothing: run it as one process, not under torchrun")
            check_out(run_dir, stage.name, False, cfg.overwrite)
            raise NothingToDo(stage.run_without_training(cfg, run_dir))
        _train_locked(stage, cfg, argv, world, device, run_dir, created, lock)
    except BaseException:
        if created and world.is_main and run_dir.is_dir() and not (run_dir / "run.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed start leaves no folder behind
        raise
    finally:
        lock.release()
    return run_dir


def _train_locked(stage: Stage, cfg, argv, world: World, device, run_dir: Path, created: bool, lock: RunLock):
    resume_from = resume_point(cfg, stage.name, run_dir)
    check_out(run_dir, stage.name, cfg.resume is not None, cfg.overwrite)
    if lock.note and world.is_main:
        print(f"note: {lock.note}")
    if cfg.resume == "auto" and resume_from is None and world.is_main:
        print(f"--resume auto: no checkpoint in {run_dir} yet: starting the run afresh there")
    bf16 = device.type == "cuda" and cfg.precision != "fp32"
    loader_kind = None
    if hasattr(cfg, "loader"):
        from dermfast.data.loader import resolve_loader
        loader_kind = resolve_loader(cfg.loader, device)
    threads, workers, budget_line = thread_budget(cfg, world, loader_kind)
    threads, threads_note = resume_threads(resume_from, threads, cfg, device)  # the checkpoint's, on CPU
    torch.set_num_threads(threads)
    dist.init(world, device)
    trainer = _Trainer(stage, cfg, run_dir, device, world, workers, threads, bf16, argv)
    try:
        if world.is_main:
            trainer.open_run_dir(resume_from is not None)
            print(budget_line if threads_note is None else f"{budget_line}\n{threads_note}")
        dist.barrier()
        return trainer.run(resume_from)
    except BaseException:
        if not trainer.started and world.is_main:  # a failed start leaves nothing behind
            if created and run_dir.is_dir():
                shutil.rmtree(run_dir, ignore_errors=True)
            elif trainer.claimed and resume_from is None:
                for name in ("run.json", "config.yaml"):
                    (run_dir / name).unlink(missing_ok=True)
        raise
    finally:
        trainer.close()
        dist.shutdown()


class _Trainer:
    def __init__(self, stage: Stage, cfg, run_dir: Path, device, world: World, workers: int, threads: int,
                 bf16: bool, argv):
        self.stage, self.cfg, self.run_dir, self.world, self.argv = stage, cfg, run_dir, world, argv
        self.r = Run(cfg, run_dir, device, world, workers, threads, bf16)
        self.started = self.claimed = False
        self.skipped = self.bad_in_row = 0  # host copies, as of the last check point
        # device truth: [steps skipped so far, non-finite steps in a row now, the longest such streak since the
        # last check point, the step that streak ended at] (a streak can end between two check points)
        self.counters = torch.zeros(4, device=device)
        # ranks agree on a stop signal at least this often (one process reads its own flag every step)
        self.agree_every = max(1, min(cfg.log_every, 10))
        self.samples_in_epoch = 0
        self.best: float | None = None
        self.log = self.eval_log = self.tb = None
        self.t0 = time.perf_counter()

    # --- the folder ------------------------------------------------------------------------------------
    def open_run_dir(self, resuming: bool) -> None:
        d = self.run_dir
        d.mkdir(parents=True, exist_ok=True)
        if not resuming and (self.cfg.overwrite or self.cfg.resume == "auto"):
            for name in ENGINE_FILES:
                p = d / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    def claim_run_dir(self) -> None:
        """After the stage built its model and data: mark the folder as this run's (run.json, config.yaml)."""
        d = self.run_dir
        self._status("running")
        save_config(self.cfg, d / "config.yaml")
        self.r.wrote(d / "config.yaml")
        self.r.wrote(d / "run.json")
        self.claimed = self.world.is_main

    def _status(self, status: str, **extra) -> None:
        if not self.world.is_main:
            return
        info = {"stage": self.stage.name, "status": status, "step": self.r.step,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "world_size": self.world.world_size, **extra}
        ckpt.write_json(self.run_dir / "run.json", info)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    # --- set-up ------------------------------------------------------------------------------------------
    def run(self, resume_from: Path | None) -> Path:
        cfg, r, stage = self.cfg, self.r, self.stage
        seed_everything(cfg.seed)
        parts = stage.build(r)
        model = parts.model
        r.raw_model = model
        if cfg.activation_checkpointing:
            n = dist.apply_activation_checkpointing(model, stage.blocks(model))
            r.log(f"activation checkpointing: {n} blocks recompute their activations in backward")
        if cfg.fsdp and not self.world.distributed:
            r.log("--fsdp with one process: nothing to shard; training unsharded (launch with torchrun)")
        r.model = self.wrapped = dist.wrap(model, self.world, r.device, fsdp=cfg.fsdp and self.world.distributed,
                                           blocks=stage.blocks(model), bf16=r.bf16)
        if cfg.compile:
            r.model = torch.compile(self.wrapped)  # after DDP / FSDP2 wrapping (DDPOptimizer splits at buckets)
            r.log(f"compile: on (torch.compile, inductor; {', '.join(COMPILE_DYNAMIC_INTS)} traced as symbolic "
                  "ints: no recompilation per step)")
        groups = stage.param_groups(model, cfg) or param_groups(model, cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        try:
            self.opt, opt_name = build_optimizer(groups, cfg.lr, cfg.betas, cfg.optimizer, r.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.loader, self.sampler = parts.loader, parts.sampler
        batches = len(self.loader)
        if batches < cfg.accum_steps:
            raise ConfigError(f"an epoch has {batches} batch(es) of {r.batch_size}, fewer than --accum-steps "
                              f"{cfg.accum_steps}: lower --batch-size or --accum-steps")
        self.total = cfg.epochs * batches // cfg.accum_steps
        if cfg.max_steps is not None:
            self.total = min(self.total, cfg.max_steps)
        r.total_steps = self.total  # the schedule's length, for stages whose own schedules span it (TEDMAE's EMA)
        spe = batches / cfg.accum_steps
        self.warmup = min(self.total, int(cfg.warmup_epochs * spe))
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        r.log(f"{stage.name}: {parts.summary}{', ' if parts.summary else ''}{n_params:.1f} M params, device "
              f"{r.device}{' (bf16 autocast)' if r.bf16 else ''}, {opt_name}")
        r.log(f"batch: {r.batch_size} per rank x {cfg.accum_steps} accum x {self.world.world_size} rank(s) = "
              f"{r.global_batch} global; lr {cfg.lr:.3g}" + (f" = blr {cfg.blr:.3g} x {r.global_batch} / 256"
                                                             if cfg.blr is not None else "")
              + f"; {self.total} steps ({spe:g} per epoch), warmup {self.warmup} -> {self.run_dir}")
        self._warn_tiny_epoch(batches)
        if resume_from is not None:
            self._resume_schedule(resume_from, spe)
        self.start_epoch, self.resume_loader = 0, None
        if self.world.is_main:
            self.claim_run_dir()
            self.log = CSVLog(self.run_dir / "log.csv")
            self.eval_log = CSVLog(self.run_dir / "eval.csv")
            self.tb = TensorBoard(self.run_dir / "tensorboard", enabled=True)
            if self.tb.reason:
                r.log(f"logs: {self.tb.reason}; CSV only")
        self.running = torch.zeros((), device=r.device)
        self.n_running = torch.zeros((), device=r.device)
        self.device_skip = isinstance(self.opt, torch.optim.AdamW) and bool(self.opt.defaults.get("fused"))
        self.host_skip_reason = ("the optimiser has no found_inf input" if not self.device_skip else
                                 "the stage has an after_step hook" if self._has_after_step() else None)
        if self.host_skip_reason:
            r.log(f"note: one host sync per step ({self.host_skip_reason}): the non-finite check is read on the host")
        if resume_from is not None:
            self._load(resume_from)
        elif self.world.is_main:
            (self.run_dir / "log.csv").unlink(missing_ok=True)
            (self.run_dir / "eval.csv").unlink(missing_ok=True)
        r.wrote(self.run_dir / "log.csv")
        if not cfg.compile:
            return self._loop()
        with torch.compiler.config.patch(dynamic_sources=_dynamic_sources()):
            return self._loop()

    def _resume_schedule(self, path: Path, steps_per_epoch: float) -> None:
        """--resume auto with other --epochs / --max-steps: say how the schedule changes; refuse to resume a run
        that is already at (or past) the end of this schedule (NothingToDo: exit 0)."""
        cfg, r = self.cfg, self.r
        state = json.loads((path / "state.json").read_text())
        step, saved = state["step"], state.get("config", {})
        if step >= self.total and not state.get("finished"):
            # killed between its last step checkpoint and the end's files (checkpoint.safetensors, run.json):
            # the loop runs no step, and the end is written from that checkpoint
            r.log(f"resume: the run reached step {step} of {self.total} but did not finish writing its results: "
                  "finishing it now")
            return
        if step >= self.total:
            raise NothingToDo(f"{self.run_dir}: the {self.stage.name} run is at step {step} and this schedule "
                              f"ends at step {self.total}: nothing to resume (more --epochs trains it longer)")
        old = int(saved.get("epochs", cfg.epochs) * steps_per_epoch)
        if saved.get("max_steps") is not None:
            old = min(old, saved["max_steps"])
        if old != self.total:
            old_warmup = min(old, int(saved.get("warmup_epochs", cfg.warmup_epochs) * steps_per_epoch))
            lr_old = warmup_cosine(step, old, old_warmup, cfg.lr, cfg.min_lr)
            lr_new = warmup_cosine(step, self.total, self.warmup, cfg.lr, cfg.min_lr)
            r.log(f"resume: the schedule changes from {old} to {self.total} steps (warmup {old_warmup} -> "
                  f"{self.warmup}); the cosine now ends at step {self.total}, so the lr at step {step} goes from "
                  f"{lr_old:.3g} to {lr_new:.3g}")

    def _warn_tiny_epoch(self, batches: int) -> None:
        cfg, r = self.cfg, self.r
        steps = batches // cfg.accum_steps
        n = len(self.sampler) if self.sampler is not None and hasattr(self.sampler, "__len__") else None
        dropped = (n - batches * r.batch_size) if n is not None else 0
        if steps < 10 or (n and dropped > 0.1 * n):
            what = f"{n} images per rank" if n is not None else f"{batches} batches"
            drop = f", {dropped} images ({dropped / n:.0%}) dropped each epoch" if n and dropped > 0.1 * n else ""
            hint = f"; try --batch-size {max(1, n // 10)}" if n else "; lower --batch-size"
            r.log(f"warning: an epoch is {steps} optimiser step(s) ({what} at batch {r.batch_size} x "
                  f"{cfg.accum_steps} accum){drop}: the schedule and the loss curve mean little{hint} "
                  "or use more data")

    # --- the loop --------------------------------------------------------------------------------------------
    def _loop(self) -> Path:
        cfg, r, stage = self.cfg, self.r, self.stage
        from tqdm.auto import tqdm
        bar = tqdm(total=self.total, initial=r.step, desc=stage.name, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.world.is_main), smoothing=0.1)
        self.started = True
        has_eval = type(stage).evaluate is not Stage.evaluate
        r.model.train()
        interval = {"t": time.perf_counter(), "wait": 0.0, "micro": 0}
        micro_in_step = 0
        acc = torch.zeros((), device=r.device)
        done = r.step >= self.total
        try:
            with Signals(self.world.is_main) as sig:
                for epoch in range(self.start_epoch, cfg.epochs):
                    if done:
                        break
                    r.epoch = epoch
                    self.loader.set_epoch(epoch)
                    if self.resume_loader is not None:
                        self._restore_loader(self.resume_loader)
                        self.resume_loader = None
                    else:
                        self.samples_in_epoch = 0
                    it = iter(self.loader)
                    while True:
                        t = time.perf_counter()
                        batch = next(it, None)
                        interval["wait"] += time.perf_counter() - t
                        if batch is None:
                            break
                        micro_in_step += 1
                        sync = micro_in_step == cfg.accum_steps
                        with dist.no_sync(self.wrapped, not sync):
                            with r.autocast():
                                loss, scalars = stage.step(batch, r)
                            (loss / cfg.accum_steps).backward()
                        acc += loss.detach().float()
                        r.micro_step += 1
                        interval["micro"] += 1
                        self.samples_in_epoch += r.batch_size
                        if not sync:
                            continue
                        micro_in_step = 0
                        stop = self._optimizer_step(acc / cfg.accum_steps, sig.signum is not None)
                        acc.zero_()
                        bar.update(1)
                        if r.step % cfg.log_every == 0 or r.step == self.total:
                            self._log_row(interval, scalars, bar)
                        done = r.step >= self.total
                        if has_eval and cfg.eval_every and r.step % cfg.eval_every == 0:
                            self._evaluate()
                        if stop:
                            self._checkpoint(mid_epoch=True)
                            raise self._interrupted(sig.signum)
                        if done:
                            break
                        if cfg.checkpoint_every and r.step % cfg.checkpoint_every == 0 and not self.bad_in_row:
                            self._checkpoint(mid_epoch=True)
                    if done:
                        break
                    if micro_in_step == 0:  # a finished epoch: evaluate and checkpoint here
                        if has_eval and not cfg.eval_every:
                            self._evaluate()
                        if cfg.epoch_checkpoints:
                            self._checkpoint(mid_epoch=False)
        except torch.OutOfMemoryError:
            raise TrainingError(self._oom_message()) from None
        finally:
            bar.close()
        if has_eval and (not cfg.eval_every or r.step % cfg.eval_every):
            self._evaluate()
        return self._finish()

    def _has_after_step(self) -> bool:
        return self.stage.uses_after_step(self.cfg)

    def _optimizer_step(self, loss: torch.Tensor, stop_requested: bool) -> bool:
        """Clip, check, step. Returns whether to stop now (a signal arrived; across ranks: agreed at check points).
        Makes no host sync unless self.host_skip_reason says why, or at check points."""
        cfg, r = self.cfg, self.r
        params = [p for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else \
            torch.zeros((), device=r.device)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor (each rank's partial norm): the global norm
            norm = norm.full_tensor()
        bad = (~torch.isfinite(norm) | ~torch.isfinite(loss)).float()
        if self.world.distributed:  # the loss differs between ranks; a device collective, no host sync
            bad = dist.all_reduce_(bad, "max")
        if cfg.clip_grad is not None:
            clip_grads_(params, cfg.clip_grad, norm)
        self.base_lr = warmup_cosine(r.step, self.total, self.warmup, cfg.lr, cfg.min_lr)
        set_lr(self.opt, self.base_lr)  # each group gets base lr x its lr_scale (layer decay)
        applied = True
        if self.host_skip_reason is None:
            self.opt.found_inf = bad  # fused AdamW leaves every parameter and its state alone when this is 1
            try:
                self.opt.step()
            finally:
                del self.opt.found_inf
        else:
            applied = not bool(bad)  # the host sync that host_skip_reason names
            if applied:
                self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ok = 1.0 - bad
        self.running += torch.where(bad > 0, torch.zeros_like(loss), loss)
        self.n_running += ok
        self.counters[0] += bad
        self.counters[1] = (self.counters[1] + 1.0) * bad
        longer = self.counters[1] > self.counters[2]
        self.counters[3] = torch.where(longer, float(r.step + 1), self.counters[3])
        self.counters[2] = torch.maximum(self.counters[1], self.counters[2])
        self.last_norm = norm
        r.step += 1
        if applied:
            self.stage.after_step(r)
        checkpoint_due = bool(cfg.checkpoint_every) and r.step % cfg.checkpoint_every == 0
        agree_due = self.world.distributed and r.step % self.agree_every == 0
        if r.step % cfg.log_every == 0 or r.step >= self.total or checkpoint_due or agree_due:
            return self._check_point(stop_requested)
        return stop_requested and not self.world.distributed

    def _check_point(self, stop_requested: bool) -> bool:
        """The host reads of a check point: the skip counters (stop a diverged run) and, across ranks, whether any
        rank got a signal. Returns whether to stop."""
        cfg, r = self.cfg, self.r
        flags = torch.cat([self.counters, torch.full((1,), float(stop_requested), device=self.counters.device)])
        skipped, in_row, worst, worst_end, stop = dist.all_reduce_(flags, "max").tolist()
        self.skipped, self.bad_in_row = int(skipped), int(in_row)
        self.counters[2] = self.counters[1]  # the next interval's longest streak starts from the current one
        self.counters[3] = float(r.step)
        if worst >= cfg.max_bad_steps:
            worst, end = int(worst), int(worst_end)
            last = ckpt.list_checkpoints(self.run_dir)
            keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
            self._status("diverged")
            raise TrainingError(
                f"{self.stage.name}: the loss or gradient was not finite for {worst} steps in a row "
                f"(steps {end - worst + 1}-{end}); stopped at step {r.step}. {keep}. Lower --lr "
                f"(now {cfg.lr:.3g}) or set --clip-grad, then --resume it")
        return bool(stop)

    def _log_row(self, interval: dict, scalars: dict, bar) -> None:
        r = self.r
        now = time.perf_counter()
        dt = max(now - interval["t"], 1e-9)
        vals = torch.stack([self.running / self.n_running.clamp(min=1), self.n_running,
                            getattr(self, "last_norm", torch.zeros((), device=r.device)).float()] +
                           [v.detach().float().reshape(()) for v in scalars.values()])
        vals = dist.all_reduce_(vals, "mean").tolist()  # the host sync of a log point
        loss, n_running, norm = vals[0], vals[1], vals[2]
        ips = interval["micro"] * r.batch_size * self.world.world_size / dt
        mem = ""
        if r.device.type == "cuda":
            mem = f"{torch.cuda.max_memory_allocated(r.device) / 2**30:.2f}"
            torch.cuda.reset_peak_memory_stats(r.device)
        row = {"epoch": r.epoch, "step": r.step, "loss": f"{loss:.6g}" if n_running else "",
               "lr": f"{self.base_lr:.4g}", "grad_norm": f"{norm:.4g}",
               "images_per_s": f"{ips:.1f}", "data_wait": f"{interval['wait'] / dt:.3f}", "gpu_mem_gib": mem,
               "skipped": self.skipped, "elapsed_s": f"{time.perf_counter() - self.t0:.1f}"}
        row.update({k: fmt(v) for k, v in zip(scalars, vals[3:])})
        if self.world.is_main:
            self.log.write(row)
            self.tb.scalars(r.step, {k: float(v) for k, v in row.items() if v not in ("",)}, prefix="train/")
            bar.set_postfix_str(f"loss {loss:.4f} | {ips:.0f} img/s | data wait {interval['wait'] / dt:.0%}"
                                + (f" | skipped {self.skipped}" if self.skipped else ""))
        self.running.zero_()
        self.n_running.zero_()
        interval.update(t=now, wait=0.0, micro=0)

    def _evaluate(self) -> None:
        r = self.r
        r.model.eval()
        with r.autocast():
            metrics = self.stage.evaluate(r) or {}
        r.model.train()
        if not metrics or not self.world.is_main:
            if metrics:
                self._maybe_best(metrics)
            return
        self.eval_log.write({"step": r.step, "epoch": r.epoch, **{k: fmt(v) for k, v in metrics.items()}})
        self.r.wrote(self.run_dir / "eval.csv")
        self.tb.scalars(r.step, metrics, prefix="eval/")
        r.log(f"eval @ step {r.step}: " + ", ".join(f"{k} {fmt(v)}" for k, v in metrics.items()))
        self._maybe_best(metrics)

    def _maybe_best(self, metrics: dict) -> None:
        sel = self.stage.selection(self.cfg)
        if sel is None or sel[0] not in metrics or metrics[sel[0]] is None:
            return
        key, mode = sel
        v = float(metrics[key])
        if self.best is None or (v > self.best if mode == "max" else v < self.best):
            self.best = v
            weights = self.stage.final_weights(self.r)  # collective under FSDP
            if self.world.is_main:
                ckpt.save_safetensors(self.run_dir / "best.safetensors", weights,
                                      self._final_meta(best={key: v}))
                self.r.wrote(self.run_dir / "best.safetensors")

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _checkpoint(self, mid_epoch: bool) -> Path | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        r = self.r
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.wrapped, self.opt, options=opts)  # full on rank 0, {} elsewhere
        extra_t, extra_meta = self.stage.extra_state()
        loader_state = None
        if mid_epoch:
            if hasattr(self.loader, "state_dict"):
                loader_state = self.loader.state_dict()
            elif self.sampler is not None:
                loader_state = {"engine_sampler_state": self.sampler.state_dict(consumed=self.samples_in_epoch)}
        rng = {"torch": torch.get_rng_state().tolist(), "numpy": _np_state(), "python": _py_state(),
               "cuda": torch.cuda.get_rng_state(r.device).tolist() if r.device.type == "cuda" else None}
        per_rank = _gather({"loader": loader_state, "rng": rng})
        path = self._write_checkpoint(model_sd, optim_sd, extra_t, extra_meta, per_rank, mid_epoch) \
            if self.world.is_main else None
        # The other ranks wait for rank 0's write: on an interrupt they would otherwise exit first, and torchrun
        # tears down the remaining workers (rank 0 mid-write) when one exits non-zero.
        dist.barrier()
        return path

    def _write_checkpoint(self, model_sd, optim_sd, extra_t, extra_meta, per_rank, mid_epoch: bool) -> Path:
        r = self.r
        optim_t, optim_meta = ckpt.flatten_optimizer(optim_sd)
        tensors = {f"stage/{k}": v for k, v in extra_t.items()}
        for rank, pr in enumerate(per_rank):
            tensors[f"rng/{rank}/torch"] = torch.tensor(pr["rng"].pop("torch"), dtype=torch.uint8)
            cuda = pr["rng"].pop("cuda")
            if cuda is not None:
                tensors[f"rng/{rank}/cuda"] = torch.tensor(cuda, dtype=torch.uint8)
        state = {"stage": self.stage.name, "step": r.step, "micro_step": r.micro_step,
                 "epoch": r.epoch if mid_epoch else r.epoch + 1, "mid_epoch": mid_epoch,
                 "samples_in_epoch": self.samples_in_epoch if mid_epoch else 0,
                 "skipped": int(self.counters[0]), "bad_in_row": int(self.counters[1]),
                 "bad_streak": [int(self.counters[2]), int(self.counters[3])], "best": self.best,
                 "running": [float(self.running), int(self.n_running)], "world_size": self.world.world_size,
                 "threads": torch.get_num_threads(),  # CPU sums depend on it (preflight.resume_threads)
                 "per_rank": per_rank, "optimizer": optim_meta, "stage_extra": extra_meta,
                 "config": config_dict(self.cfg), "finished": False,
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = ckpt.write_checkpoint(self.run_dir, r.step, {"model.safetensors": (model_sd, None),
                                                            "optimizer.safetensors": (optim_t, None),
                                                            "extra.safetensors": (tensors, None)},
                                     state, keep=self.cfg.keep_checkpoints)
        self._status("running", checkpoint=str(path))
        return path

    def _load(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        r = self.r
        tensors, state = ckpt.read_checkpoint(path)
        optim_sd = ckpt.unflatten_optimizer(tensors.get("optimizer", {}), state["optimizer"])
        set_state_dict(self.wrapped, self.opt, model_state_dict=tensors["model"], optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        extra = tensors.get("extra", {})
        self.stage.load_extra_state({k[6:]: v for k, v in extra.items() if k.startswith("stage/")},
                                    state.get("stage_extra", {}))
        r.step, r.micro_step, r.epoch = state["step"], state["micro_step"], state["epoch"]
        self.start_epoch = state["epoch"]
        self.samples_in_epoch = state["samples_in_epoch"]
        self.skipped, self.bad_in_row, self.best = state["skipped"], state["bad_in_row"], state["best"]
        streak = state.get("bad_streak", [self.bad_in_row, state["step"]])
        self.counters.copy_(torch.tensor([float(self.skipped), float(self.bad_in_row), *map(float, streak)]))
        self.running.fill_(state["running"][0])
        self.n_running.fill_(state["running"][1])
        same_world = state["world_size"] == self.world.world_size
        if same_world:
            pr = state["per_rank"][self.world.rank]
            torch.set_rng_state(extra[f"rng/{self.world.rank}/torch"])
            if r.device.type == "cuda" and f"rng/{self.world.rank}/cuda" in extra:
                torch.cuda.set_rng_state(extra[f"rng/{self.world.rank}/cuda"], r.device)
            np.random.set_state(_np_unstate(pr["rng"]["numpy"]))
            random.setstate(_py_unstate(pr["rng"]["python"]))
            self.resume_loader = pr["loader"] if state["mid_epoch"] else None
        else:
            r.log(f"resume: the checkpoint was written by {state['world_size']} rank(s), this run has "
                  f"{self.world.world_size}: resuming at the start of epoch {state['epoch'] + state['mid_epoch']}"
                  " (not bit-exact)")
            self.start_epoch += int(state["mid_epoch"])
        if self.world.is_main:
            self.log.truncate_after(r.step)
            self.eval_log.truncate_after(r.step) if (self.run_dir / "eval.csv").is_file() else None
        r.log(f"resumed from {path} at step {r.step} (epoch {r.epoch}, {self.samples_in_epoch} samples into it)")

    def _restore_loader(self, state: dict) -> None:
        if "engine_sampler_state" in state:  # a loader without state_dict: its sampler's position
            self.sampler.load_state_dict(state["engine_sampler_state"])
        else:
            self.loader.load_state_dict(state)

    def _interrupted(self, signum: int) -> Interrupted:
        self._status("interrupted")
        name = signal.Signals(signum).name
        return Interrupted(f"{name} at step {self.r.step}: checkpoint written to {self.run_dir}/checkpoints; "
                           f"resume with: {resume_command(self.argv)}", 128 + signum)

    def _oom_message(self) -> str:
        cfg, r = self.cfg, self.r
        model = getattr(cfg, "preset", None) or getattr(cfg, "model", None) or self.stage.name
        half = max(1, r.batch_size // 2)
        return (f"out of GPU memory on {r.device} with {model} at --batch-size {r.batch_size} per GPU: try "
                f"--batch-size {half} --accum-steps {cfg.accum_steps * 2} (the same global batch)"
                + ("" if cfg.activation_checkpointing else ", --activation-checkpointing")
                + ("" if cfg.fsdp else ", or --fsdp under torchrun"))

    # --- the end ----------------------------------------------------------------------------------------------
    def _final_meta(self, **extra) -> dict:
        return {"stage": self.stage.name, "step": self.r.step, "epoch": self.r.epoch,
                "config": config_dict(self.cfg), **self.stage.final_meta(self.r), **extra}

    def _finish(self) -> Path:
        r, d = self.r, self.run_dir
        path = self._checkpoint(mid_epoch=False)
        weights = self.stage.final_weights(r)
        files = [Path(p) for p in self.stage.finish(r) or []]
        if not self.world.is_main:
            return d
        # the weights first, then the mark: a kill in between leaves an unfinished run that --resume auto finishes
        ckpt.save_safetensors(d / "checkpoint.safetensors", weights, self._final_meta())
        state = json.loads((path / "state.json").read_text())
        state["finished"] = True
        ckpt.write_json(path / "state.json", state)
        r.wrote(d / "checkpoint.safetensors")
        r.wrote(path)
        for f in files:
            r.wrote(f)
        from dermfast.eval.plots import save_training_plots
        try:
            r.wrote(save_training_plots(d / "log.csv", d / "plots.png", eval_csv=d / "eval.csv"))
        except ValueError as e:  # e.g. a run too short for a curve
            r.log(f"plots: {e}")
        if self.tb is not None and self.tb.writer is not None:
            r.wrote(d / "tensorboard")
        self._status("finished")
        names = [str(p.relative_to(d)) if p.is_relative_to(d) else str(p) for p in r.files if p.exists()]
        print(f"{self.stage.name}: done in {time.perf_counter() - self.t0:.0f} s; wrote {d}/"
              "{" + ", ".join(names) + "}")
        return d


def _gather(obj) -> list:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _np_state() -> list:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _np_unstate(s: list):
    return (s[0], np.asarray(s[1], dtype=np.uint32), s[2], s[3], s[4])


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _py_unstate(s: list):
    return (s[0], tuple(s[1]), s[2])


__all__ = ["train", "TrainingError", "Interrupted", "thread_budget", "check_out", "seed_everything",
           "resolve_device"]
