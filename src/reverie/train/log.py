"""What a run reports (rank 0 only): a tqdm bar with loss and it/s, a CSV file, and TensorBoard if installed."""

from __future__ import annotations

import csv
import time
from pathlib import Path

from tqdm.auto import tqdm

COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "skipped", "nonfinite", "it_per_s", "elapsed_s")


class RunLog:
    """log.csv in the output dir; on resume, rows after the resumed step (from a run that went further before it
    died) are dropped so that the file reads as one run."""

    def __init__(self, out_dir: Path, start_step: int, total_steps: int, *, enabled: bool, progress: bool,
                 tensorboard: bool):
        self.enabled = enabled
        self.bar = tqdm(total=total_steps, initial=start_step, desc="training", dynamic_ncols=True,
                        disable=not (enabled and progress))
        self.start = self.last_time = time.perf_counter()
        self.last_step = start_step
        self.writer = None
        if not enabled:
            return
        path = out_dir / "log.csv"
        rows = []
        if path.is_file() and start_step > 0:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= start_step]
        self.file = open(path, "w", newline="", encoding="utf-8")
        self.csv = csv.DictWriter(self.file, fieldnames=COLUMNS, extrasaction="ignore")
        self.csv.writeheader()
        self.csv.writerows(rows)
        self.file.flush()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def step(self, step: int, loss: float, lr: float) -> None:
        if self.enabled:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)

    def row(self, **values) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        steps = values["step"] - self.last_step
        values |= {"it_per_s": f"{steps / max(now - self.last_time, 1e-9):.3f}",
                   "elapsed_s": f"{now - self.start:.1f}"}
        self.last_time, self.last_step = now, values["step"]
        self.csv.writerow(values)
        self.file.flush()
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm"):
                if values.get(key) is not None:
                    self.writer.add_scalar(f"train/{key}", float(values[key]), values["step"])

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()
