"""Checkpoints on disk: their layout, finding the newest complete one, what may change on resume.

A checkpoint is a directory ``CHECKPOINT_DIR/step-00000100`` (the training steps it holds, 8 digits), written as
``.tmp-step-00000100`` and renamed into place once whole, so a directory named ``step-*`` is always complete:

    trainer.json        step, policy version, scheduler cursors, counters, data sizes (written last)
    config.yaml         the config of the run that wrote it
    model/              the policy in Hugging Face format (safetensors + tokenizer): loadable by transformers, vLLM
    learner/            DeepSpeed state of every learner rank (module, ZeRO optimiser partitions, lr scheduler) and
                        each rank's RNG state (safetensors)
    critic/             the same for the PPO critic (algo.advantage = gae)
    rollouts.msgpack    async mode: the scored rollouts of the next steps, generated before the checkpoint

Every random draw of the driver is derived from (train.seed, step), so the scheduler's cursors and the step are
all of its state; sampling is seeded per request (``SamplingSpec.seed``), so a fresh engine samples what the old
one would have.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from actors.config import ChorusConfig, ConfigError

NAME = re.compile(r"step-(\d{8})")
log = logging.getLogger("chorus")

# Config keys a resumed run may change: sizes of the stateless pools, limits, and where things go. Anything else
# (the model, data, algorithm, optimiser, learner world size) is part of what the checkpoint's state means.
RESUMABLE = ("train.steps", "train.eval_every", "train.eval_max_rows", "train.max_learner_failures",
             "checkpoint.", "ray.", "metrics.", "data.on_bad_row",
             "rollout.num_actors", "rollout.num_cpus", "rollout.num_threads", "rollout.kv_cache_gib",
             "rollout.gpu_memory_utilization", "rollout.deadline_s", "rollout.sync_dir",
             "reward.num_actors", "reward.num_cpus", "reward.timeout_s", "reward.deadline_s",
             "env.num_actors", "env.num_cpus", "env.timeout_s", "env.deadline_s",
             "learner.num_cpus", "learner.num_threads", "learner.deadline_s",
             "critic.num_cpus", "critic.num_threads", "critic.deadline_s",
             "reference.num_actors", "reference.num_cpus", "reference.num_threads")


def complete(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name))


def newest(root: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint and its trainer state, or None. One that cannot be read stops the run at
    start (resuming from an older one silently would redo steps the user may not expect to lose)."""
    found = complete(root)
    if not found:
        return None
    path = found[-1]
    try:
        state = json.loads((path / "trainer.json").read_text())
        for key in ("step", "version", "plan_from", "scheduler", "data"):
            state[key]  # noqa: B018 - a KeyError names what is missing
        for part in ("learner", "model", "config.yaml"):
            if not (path / part).exists():
                raise FileNotFoundError(f"{part} is missing")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        older = f"move it aside to resume from {found[-2].name}" if len(found) > 1 else "move it aside"
        raise ConfigError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}): {older}, or start a "
                          f"new --run-dir") from None
    return path, state


def start_from(cfg: ChorusConfig, run_dir: Path, root: Path, *, resume: bool) -> tuple[Path, dict] | None:
    """The checkpoint a run starts from (None: step 0), after refusing a start that would mix two runs or lose one.

    Without ``resume`` the run dir and ``root`` (the checkpoint dir) must hold no run yet. With it, the newest
    complete checkpoint under ``root`` must accept the config; and a run dir whose metrics.jsonl has logged steps
    needs a checkpoint: starting it again from step 0 would move every record aside, most often because
    ``checkpoint.dir`` points elsewhere than when the run wrote them. A run dir with no logged step starts from
    step 0 (how a job that always passes --resume starts a fresh run), and so does one that logged fewer steps than
    ``checkpoint.every`` into the checkpoint dir it names (no checkpoint was due yet)."""
    log_path = run_dir / "metrics.jsonl"
    if not resume:
        if log_path.exists():
            raise ConfigError(f"run dir {run_dir} already holds a run (metrics.jsonl): pass --resume to continue it "
                              f"from its newest checkpoint, or choose another --run-dir")
        if complete(root):  # another run's, e.g. a shared checkpoint.dir
            raise ConfigError(f"checkpoint dir {root} already holds checkpoints: pass --resume to continue that run, "
                              f"or set checkpoint.dir to a directory of this run's own")
        return None
    found = newest(root)
    if found:
        check_resumable(cfg, found[0])
        if found[1]["step"] > cfg.train.steps:
            raise ConfigError(f"config key 'train.steps': {cfg.train.steps} is fewer than the {found[1]['step']} "
                              f"steps checkpoint {found[0]} holds; resume with train.steps >= {found[1]['step']}")
        return found
    steps = logged_steps(log_path)
    if steps and not _none_due(cfg, run_dir, root, steps):
        setting = f"checkpoint.dir = {cfg.checkpoint.dir}" if cfg.checkpoint.dir else "the default, RUN_DIR/checkpoints"
        raise ConfigError(f"--resume: no complete checkpoint in {root} ({setting}), but {log_path} holds {steps} "
                          f"step records.{_elsewhere(run_dir, root)} Resume with the checkpoint.dir that run wrote to; "
                          f"or, to start it again from step 0, move metrics.jsonl aside")
    return None


def _none_due(cfg: ChorusConfig, run_dir: Path, root: Path, steps: int) -> bool:
    """Whether the run never reached a checkpoint: fewer logged steps than ``checkpoint.every`` (or none periodic),
    with the checkpoint dir its last start recorded. Then step 0 is where it resumes (a KubeRay retry of a job that
    died before its first checkpoint), its records moving aside as a rollback does."""
    recorded = _recorded_root(run_dir)
    return recorded is not None and recorded.resolve() == root.resolve() and (
        cfg.checkpoint.every == 0 or steps < cfg.checkpoint.every)


def _recorded_root(run_dir: Path) -> Path | None:
    """The checkpoint dir the run's last start wrote in RUN_DIR/config.yaml (its checkpoint.dir, else the default
    RUN_DIR/checkpoints); None when that file cannot be read."""
    try:
        then = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        return Path((then.get("checkpoint") or {}).get("dir") or run_dir / "checkpoints")
    except (OSError, ValueError, AttributeError, TypeError, yaml.YAMLError):
        return None


def logged_steps(path: Path) -> int:
    """Step records in a run's metrics.jsonl (0 if there is none; a line cut short by a kill, and the records of the
    evaluations before training and after the last step, are not ones)."""
    if not path.is_file():
        return 0
    count = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                count += isinstance(record.get("step"), int) and not record.get("final") and not record.get("initial")
            except (ValueError, AttributeError, RecursionError):
                continue
    return count


def _elsewhere(run_dir: Path, root: Path) -> str:
    """Where else the run's checkpoints may be: the checkpoint dir its last start recorded, and the default
    RUN_DIR/checkpoints, if one of them holds some."""
    for place in dict.fromkeys(p for p in (_recorded_root(run_dir), run_dir / "checkpoints") if p is not None):
        if place.resolve() != root.resolve() and (held := complete(place)):
            return f" {place} holds {', '.join(p.name for p in held)}."
    return ""


def check_resumable(cfg: ChorusConfig, checkpoint: Path) -> None:
    """The config of a resumed run may differ from the one that wrote the checkpoint only in :data:`RESUMABLE`."""
    from actors.config import load_config

    try:
        then = _flat(OmegaConf.to_container(OmegaConf.structured(load_config(checkpoint / "config.yaml",
                                                                             legacy=True))))
    except ConfigError as exc:  # written before a check that now refuses one of its values
        raise ConfigError(f"checkpoint {checkpoint.name}: the config it was written with no longer loads ({exc}); "
                          f"fix that key in {checkpoint / 'config.yaml'} to the value this run uses") from None
    now = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    changed = sorted(k for k in then.keys() | now.keys()
                     if then.get(k) != now.get(k) and not k.startswith(RESUMABLE))
    if changed:
        diffs = "; ".join(f"'{k}' was {then.get(k)!r}, now {now.get(k)!r}" for k in changed[:8])
        raise ConfigError(f"config keys changed since checkpoint {checkpoint.name} was written: {diffs}. Resume with "
                          f"the run's values (they are in {checkpoint / 'config.yaml'}), or start a new --run-dir")


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "args":  # a reward's args compare whole
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def publish(tmp: Path, final: Path, keep: int) -> None:
    """Make the checkpoint written to ``tmp`` the complete one ``final``, then delete all but the newest ``keep``.

    The files reach the disk before the rename (so ``step-N`` never names a half-written checkpoint), and the rename
    reaches it before any older checkpoint is deleted: the directory holding both is fsynced in between. Otherwise a
    crash or power loss could keep the deletions and lose the rename, leaving fewer complete checkpoints than
    ``keep``, or none."""
    os.sync()
    tmp.rename(final)
    fsync_dir(final.parent)
    prune(final.parent, keep, current=tmp)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames, new names) to disk. A file system that cannot (EINVAL: some FUSE and
    network mounts) is warned about; a real I/O error raises."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        log.warning("cannot fsync directory %s (%s): its last rename may not be durable yet", path, exc.strerror)
    finally:
        os.close(fd)


def prune(root: Path, keep: int, *, current: Path) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and temporary ones other than ``current``'s."""
    for old in complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".tmp-step-*"):
        if tmp != current:
            shutil.rmtree(tmp, ignore_errors=True)


# --- rollouts of steps not trained yet (async mode) ----------------------------------------------------------
