"""What a person reads during and after a run: the progress bar, log.csv, eval.csv, TensorBoard scalars.

log.csv (always): one row every --log-every optimiser steps: epoch, step, loss (mean over the interval),
lr (the schedule's base lr at the row's last step; a layer-decayed group runs at base lr x its lr_scale),
grad_norm (before clipping), images_per_s, data_wait (fraction of the interval spent blocked on the
loader), gpu_mem_gib (peak allocated in the interval; empty on CPU), skipped (non-finite steps so far),
elapsed_s, then the stage's own scalars. eval.csv: one row per evaluation (step, epoch, metrics).
TensorBoard (RUN/tensorboard/) when `tensorboard` is installed; the run says when it is not.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from dermfast.train.checkpoint import file_mode

TRAIN_COLUMNS = ("epoch", "step", "loss", "lr", "grad_norm", "images_per_s", "data_wait", "gpu_mem_gib",
                 "skipped", "elapsed_s")


class CSVLog:
    """Append rows to a CSV file; the header comes from the first row's keys (or the existing file's)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fields: list[str] | None = None
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, newline="") as f:
                self._fields = next(csv.reader(f), None)

    def write(self, row: dict) -> None:
        new = self._fields is None
        if new:
            self._fields = list(row)
        extra = [k for k in row if k not in self._fields]
        if extra:
            raise ValueError(f"{self.path.name}: columns {extra} appeared after the header was written")
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields)
            if new:
                w.writeheader()
            w.writerow(row)

    def truncate_after(self, step: int) -> None:
        """Keep the rows with step <= `step` (a resumed run rewrites what came after its checkpoint)."""
        if not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
            fields = rows and list(rows[0].keys()) or self._fields
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            if fields:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                # a row cut short by a kill mid-write has missing fields: drop it with what came after
                w.writerows(r for r in rows if None not in r.values() and int(r["step"]) <= step)
        os.chmod(tmp, file_mode())
        os.replace(tmp, self.path)
        self._fields = fields or None


class TensorBoard:
    """SummaryWriter when torch.utils.tensorboard imports (needs the tensorboard package); else inert."""

    def __init__(self, log_dir: Path, enabled: bool):
        self.writer, self.reason = None, ""
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            self.reason = f"TensorBoard off ({e.name or e}: pip install tensorboard)"
            return
        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                self.writer.add_scalar(f"{prefix}{k}", v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)
