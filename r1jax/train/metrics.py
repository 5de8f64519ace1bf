"""Metrics and progress: WORKDIR/metrics.jsonl, TensorBoard events (WORKDIR/tb), a tqdm bar.

Only process 0 writes (`enabled`); other processes get a logger that does nothing. On resume from step
s, records with step > s are dropped from metrics.jsonl and TensorBoard purges events after s, so an
interrupted-and-resumed run leaves the same files as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def _plain(value: Any):
    """JSON-friendly Python scalar (NaN/Inf become strings so the file stays valid JSON)."""
    value = np.asarray(value).item() if isinstance(value, (np.ndarray, np.generic)) or hasattr(value, "dtype") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path: str, records: list[Mapping[str, Any]]) -> None:
    """Appends records to a JSONL file (samples.jsonl: what a researcher reads beside the metrics)."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps({k: _plain(v) for k, v in r.items()}, ensure_ascii=False) + "\n" for r in records)


def forget_after(path: str, step: int | None) -> None:
    """Drops the records of a JSONL log with a step after `step` (all of them when None): a resumed run rewrites
    them, so an interrupted-and-resumed run leaves the same file as an uninterrupted one."""
    if os.path.exists(path):
        kept = [] if step is None else [r for r in read_metrics(path) if r.get("step", 0) <= step]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)


class MetricsLogger:
    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, enabled: bool = True,
                 progress: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        forget_after(self.path, start_step)  # resume: forget what was logged after the restored step
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1 if start_step else None)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                             mininterval=1.0)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One record {step, **metrics} in metrics.jsonl and a scalar per numeric metric in TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def progress(self, n_steps: int, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n_steps)
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                      refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
