"""Optional metric sinks: the records of metrics.jsonl, also sent to TensorBoard and to Weights & Biases.

Both take a record's numeric values (bools as 0/1, NaN as it is) at the record's ``step``, each key as its own tag or
metric ("eval/target/accuracy" stays as it is: TensorBoard groups tags by the part before the first slash); they skip
None, text, lists and the ``step`` key itself.

- ``TensorBoardSink`` writes event files into ``log_dir`` (RUN/tensorboard), flushed after every record:
  ``tensorboard --logdir RUN/tensorboard``.
- ``WandbSink`` writes a W&B run under RUN/wandb, offline by default (nothing leaves the machine, no login):
  ``wandb sync RUN/wandb/offline-run-*`` uploads it later, a resumed run's directories into the one run. Outside
  RUN, wandb's service writes only its debug logs, to ~/.cache/wandb/logs ($WANDB_CACHE_DIR/wandb/logs if set).

A resumed run logs again the steps after its checkpoint. TensorBoard hides the old events from the first step the
new process logs (its restart marker, ``purge_step``; ``--load_fast=false`` shows both); W&B keeps the values it got
first (see ``WandbSink``).
"""

from __future__ import annotations

import json
import logging
import numbers
import secrets
from pathlib import Path

log = logging.getLogger(__name__)


def scalars(record: dict) -> dict[str, int | float]:
    """The values a sink logs: numbers, with bools as 0/1; None, text, lists and the step itself left out."""
    return {key: int(value) if isinstance(value, bool) else value for key, value in record.items()
            if key != "step" and isinstance(value, numbers.Real)}


class TensorBoardSink:
    """One scalar per key per record, ``global_step=record["step"]``, in event files under ``log_dir``.

    The writer opens on the first record: if ``log_dir`` already holds events (a resumed run), that record's step is
    the ``purge_step``, so TensorBoard drops the crashed run's events from that step on and shows the redone ones.
    """

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer = None

    def write(self, record: dict) -> None:
        step = record["step"]
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            resumed = any(self.log_dir.glob("events.out.tfevents.*"))
            self.writer = SummaryWriter(str(self.log_dir), purge_step=step if resumed else None)
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a crash loses nothing written

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """A W&B run in ``run_dir/wandb``: each record's scalars at ``step=record["step"]``.

    W&B steps only go up, and a row is committed once a higher step is logged. Records of one step merge into one
    row (the starting model's evaluation and step 0's training); the row stays open until the next step, so a crash
    loses the last step's row. A step below the open row is dropped, and so is, after a resume, a step the crashed
    process had committed (``run_dir/wandb_run.json`` keeps the run id and that step): W&B keeps the values it got
    first, metrics.jsonl the redone ones. ``mode``: "offline" (no network, no login), "online" (credentials from
    WANDB_API_KEY or ``wandb login``), "disabled".
    """

    STATE = "wandb_run.json"  # {"id": the W&B run id, "step": the last step whose row W&B committed}

    def __init__(self, run_dir: Path, *, project: str, name: str, mode: str, config: dict):
        import wandb

        (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)
        self.state = Path(run_dir) / self.STATE
        if self.state.exists():
            saved = json.loads(self.state.read_text(encoding="utf-8"))
            self.id, self.committed = saved["id"], saved["step"]
        else:
            self.id, self.committed = secrets.token_hex(6), -1
            self._save(-1)
        self.open_step: int | None = None  # the step of the row W&B holds open
        self.dropped = 0
        # silent, console "off": no banner, and the driver's output stays out of the run. The transaction log is
        # flushed each second (default 15 s: a killed driver lost all it logged since); older wandb lacks the setting.
        flush = "x_transaction_log_flush_interval"
        settings = wandb.Settings(mode=mode, silent=True, console="off",
                                  **({flush: 1.0} if flush in wandb.Settings.model_fields else {}))
        # wandb's own telemetry reads the process-wide settings: without this it probes the server even offline.
        wandb.setup(settings=settings)
        self.run = wandb.init(dir=str(run_dir), project=project, name=name, id=self.id, resume="allow",
                              config=config, settings=settings, reinit="create_new")
        if mode == "online":
            log.info("W&B run: %s", self.run.url)  # silent hides wandb's own line

    def _save(self, step: int) -> None:
        self.committed = step
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps({"id": self.id, "step": step}), encoding="utf-8")
        tmp.replace(self.state)

    def write(self, record: dict) -> None:
        step = record["step"]
        if step <= self.committed or (self.open_step is not None and step < self.open_step):
            self.dropped += 1
            return
        self.run.log(scalars(record), step=step)  # commit=False: a later call at this step adds to the row
        if self.open_step is not None and step > self.open_step:
            self._save(self.open_step)  # logging a higher step committed the open row
        self.open_step = step

    def close(self) -> None:
        """Finish the run, and stop wandb's service process unless the process has a run of its own (``wandb.run``)."""
        import wandb

        self.run.finish()
        if self.open_step is not None:
            self._save(self.open_step)
        if self.dropped:
            log.info("W&B run %s: %d re-logged records dropped (W&B keeps a step's first values)", self.id,
                     self.dropped)
        if wandb.run is None:
            wandb.teardown()


def open_sinks(cfg, run_dir: Path) -> list:
    """The sinks ``cfg.metrics`` (a ``ChorusConfig``'s) turns on: ``tensorboard`` into RUN/tensorboard, ``wandb`` a
    run named ``wandb_name`` (or the run directory's name) with the resolved config."""
    from dataclasses import asdict

    m, sinks = cfg.metrics, []
    if m.tensorboard:
        sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
    if m.wandb:
        from actors.config import ConfigError

        try:
            sinks.append(WandbSink(Path(run_dir), project=m.wandb_project, name=m.wandb_name or Path(run_dir).name,
                                   mode=m.wandb_mode, config=asdict(cfg)))
        except Exception as exc:  # online without credentials, a bad project name: say which key, not a traceback
            for sink in sinks:
                sink.close()
            raise ConfigError(f"config key 'metrics.wandb': the W&B run could not start ({type(exc).__name__}: "
                              f"{exc})") from None
    return sinks
