"""A run's scalars: metrics.jsonl (one JSON line per logged step or evaluation), TensorBoard, and curves.png."""
import json
import math
import time
from pathlib import Path

from matplotlib.figure import Figure
from tensorboard.summary import Writer


class MetricsLog:
    """Scalars to metrics.jsonl and TensorBoard; only process 0 writes."""

    def __init__(self, output_dir, section, primary):
        self.primary = primary
        self.jsonl = self.writer = None
        if primary:
            self.jsonl = open(Path(output_dir) / "metrics.jsonl", "a", encoding="utf-8")
            if section.tensorboard:
                self.writer = Writer(str(Path(output_dir) / "tensorboard"))

    def write(self, step, kind, values):
        if not self.primary:
            return
        self.jsonl.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
            self.writer.flush()

    def close(self):
        if self.primary:
            self.jsonl.close()
            if self.writer is not None:
                self.writer.close()


def read_metrics(output_dir):
    """The records of metrics.jsonl; a resumed run's repeated steps keep their latest value."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    latest = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(record["kind"], record["step"])] = record
    return sorted(latest.values(), key=lambda r: (r["kind"], r["step"]))


def plot_curves(output_dir):
    """curves.png: training loss and in-batch accuracy, and held-out recall@1, over steps.

    Drawn on a bare `Figure` (no pyplot), so that plotting neither needs nor switches a GUI backend."""
    records = read_metrics(output_dir)
    train = [r for r in records if r["kind"] == "train"]
    heldout = [r for r in records if r["kind"] == "eval"]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="loss", lw=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("InfoNCE loss")
    twin = axes[0].twinx()
    twin.plot([r["step"] for r in train], [r["accuracy"] for r in train], color="tab:orange", lw=1,
              label="in-batch accuracy")
    twin.set_ylabel("in-batch accuracy")
    axes[1].plot([r["step"] for r in heldout], [r["recall@1"] for r in heldout], marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("held-out recall@1")
    axes[1].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(Path(output_dir) / "curves.png", dpi=100)
