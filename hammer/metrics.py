"""What a training run reports: `metrics.jsonl`, TensorBoard events and model FLOP utilization.

Every record is one JSON line with `step` (optimizer steps completed) and `kind` ("train" or
"eval"). After a resume from step S the file is first cut back to the records of steps <= S, so it
holds one clean curve whatever was logged after the checkpoint before a kill. TensorBoard gets the
same numbers (nested keys joined by "/") through tensorboardX, which needs no TensorFlow.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from hammer.config import ConfigError
from hammer.errors import HammerError
from hammer.fsio import atomic_file
from hammer.run import METRICS_FILE, TENSORBOARD_DIR

# Dense bf16 FLOP/s of one device, by a piece of its device kind; the first match wins, so the
# more specific names come first.
PEAK_FLOPS = (
    ("A100", 312e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)


def peak_flops(device_kind: str, override: float = 0.0) -> float | None:
    """The device's peak from the table, or `override` when set; None for a device not listed."""
    if override:
        return override
    return next((flops for name, flops in PEAK_FLOPS if name.lower() in device_kind.lower()), None)


def mfu(flops_per_token: float, tokens_per_s: float, devices: int, peak: float | None) -> float | None:
    """Model FLOP utilization: the model's training FLOPs done per second over the devices' peak."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (devices * peak)


def perplexity(loss: float) -> float:
    """exp(loss), capped where a float64 would overflow (a diverging model's eval must not crash)."""
    return math.exp(min(loss, 700.0))


class DivergedError(HammerError):
    """A non-finite loss or gradient norm: the run stops before saving anything after it."""


def check_finite(step: int, **values: float) -> None:
    """Stops a run at the first non-finite loss or gradient norm, naming the step."""
    bad = {name: v for name, v in values.items() if not math.isfinite(v)}
    if bad:
        raise DivergedError(f"step {step}: non-finite {', '.join(f'{k} = {v}' for k, v in bad.items())}; "
                                 f"the run stops here and nothing after the last checkpoint is saved")


class TrainMeter:
    """The train record of the steps since the previous one, the same on both backends: the mean
    of each loss, the last update's lr, grad norm and counts, tokens so far,
    speed and MFU. Time is the loop's wall time between reads of the device (data loading, which
    overlaps the device's work, included; evaluation and checkpoints not)."""

    MEAN_KEYS = ("loss", "z_loss")  # the others are the last step's ("skipped": so far)

    def __init__(self, tokens_per_step: int, flops_per_token: float, devices: int, peak: float | None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.devices, self.peak = devices, peak
        self.steps, self.seconds = [], 0.0

    def add(self, steps: list[Mapping[str, float]], seconds: float) -> None:
        """Steps read from the device together, and the wall time they took."""
        self.steps.extend(steps)
        self.seconds += seconds

    def record(self, step: int) -> dict[str, Any]:
        n = len(self.steps)
        tokens_per_s = n * self.tokens_per_step / self.seconds
        record: dict[str, Any] = {"step": step, "kind": "train"}
        for key in self.steps[-1]:
            values = [s[key] for s in self.steps]
            record[key] = sum(values) / n if key in self.MEAN_KEYS else values[-1]
        record.update({"tokens": step * self.tokens_per_step, "tokens_per_s": tokens_per_s,
                       "tokens_per_s_per_device": tokens_per_s / self.devices,
                       "step_time": self.seconds / n,
                       "mfu": mfu(self.flops_per_token, tokens_per_s, self.devices, self.peak)})
        self.steps, self.seconds = [], 0.0
        return record


class MetricsLog:
    """The run's metrics.jsonl and TensorBoard writer, continuing after step `resume_step`."""

    def __init__(self, run_dir: str | Path, resume_step: int = 0, *, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            with atomic_file(self.path) as f:
                f.write("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        self._tensorboard = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard = true needs the tensorboardX package "
                                  "(pip install tensorboardX), or set tensorboard=false") from None
            # purge_step drops events a killed run logged after the checkpoint it resumes from.
            self._tensorboard = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR),
                                              purge_step=resume_step + 1)

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            prefix = record.get("kind", "train")
            for tag, value in _flatten(record).items():
                if tag not in ("step", "kind") and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(f"{prefix}/{tag}", value, record["step"])
            self._tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}: not a hammer run directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
