"""logger=tensorboard: event files in the run directory (``<run dir>/tensorboard/``), which
``tensorboard --logdir`` names by their path. Per epoch the history row's values; at the end the
final numbers, the run's YAML and JSON files as text and its plots as images.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from mer_cli.training.tracking_record import PLOTS_DIR, plots, run_files


class TensorBoard:
    def __init__(self, log_dir: Path, params: dict[str, bool | int | float | str]) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.log_dir, self.params = log_dir, params
        # a resumed or copied run: its earlier epochs may be in these files already
        self.earlier_files = any(log_dir.glob("events.out.tfevents.*"))
        self._writer_class = SummaryWriter
        self._writer: Any = None
        self.last_step = 0

    def open(self) -> None:
        pass  # the writer is made on first use

    def probe(self) -> None:
        pass  # local files

    @property
    def writer(self) -> Any:
        if self._writer is None:  # created on first use: a run that fails before training leaves none
            self._writer = self._writer_class(log_dir=str(self.log_dir))
        return self._writer

    def log_epoch(self, epoch: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=epoch)
        self.writer.flush()
        self.last_step = max(self.last_step, epoch)

    def earlier_steps(self, tag: str) -> set[int]:
        """The steps of ``tag`` in the event files this run directory held before this process."""
        if not self.earlier_files:
            return set()
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        self.writer.flush()
        events = EventAccumulator(str(self.log_dir), size_guidance={"scalars": 0})
        events.Reload()
        if tag not in events.Tags()["scalars"]:
            return set()
        return {e.step for e in events.Scalars(tag)}

    def logged_epochs(self) -> set[int]:
        return self.earlier_steps("val/loss")

    def log_results(self, out_dir: Path, final: dict[str, float], texts: dict[str, str]) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary
        from torch.utils.tensorboard.summary import hparams

        if self.earlier_steps("final/run/seed"):
            return  # a run copied from another job of the sweep: its results came with its files
        step = self.last_step
        # the HPARAMS tab: one row per run, the config beside its final metrics
        for summary in hparams(self.params, final):
            self.writer.file_writer.add_summary(summary, step)
        for key, value in final.items():
            self.writer.add_scalar(key, value, global_step=step)
        for path in run_files(out_dir):
            if path.suffix in (".yaml", ".json"):  # indented: markdown shows it as it is
                self.writer.add_text(path.name, "    " + path.read_text().replace("\n", "\n    "), step)
        for path in plots(out_dir):
            png = path.read_bytes()
            width, height = struct.unpack(">II", png[16:24])  # the PNG header (IHDR)
            image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
            tag = f"{PLOTS_DIR}/{path.stem}"
            self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self.writer.flush()

    def close(self, status: str) -> None:
        if self._writer is not None:
            self._writer.close()
