"""`chorus status`: where a run is, from its run directory and, while it runs, its metrics endpoint.

Read from RUN_DIR: ``config.yaml`` (train.steps, checkpoint.dir), ``metrics.jsonl`` (one record per step; a line cut
short by a crash is skipped), ``summary.json`` (the run finished), ``metrics_url`` and the checkpoints
(``step-NNNNNNNN`` directories with a ``trainer.json``; ``.tmp-step-*`` ones are being written and ignored). Live
counters (restarts, deadlines, reward failures) exist only in the endpoint, scraped with a 2 s timeout. Imports
nothing heavy: it runs beside a job, on a login node.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import yaml

from actors.evaluation import nest

RATE_WINDOW = 20  # records the rates are averaged over
SCRAPE_TIMEOUT_S = 2.0
CHECKPOINT_NAME = re.compile(r"step-(\d{8})")
ROLES = ("rollout", "reward", "reference", "learner", "critic")


class StatusError(Exception):
    """Nothing to report on: the message names the run dir or endpoint."""


# --- the run directory --------------------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl, in order; a line that does not parse (a crash mid-write) is skipped."""
    records = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
    return records


def steps_done(record: dict) -> int:
    """Training steps completed at a record: a step's record carries its 0-based index, the final one (and the
    evaluation before training, ``initial``) the count."""
    return record["step"] if record.get("final") or record.get("initial") else record["step"] + 1


def rates(records: list[dict]) -> dict | None:
    """Steps/min, samples/s and tokens/s over the last RATE_WINDOW step records, by the steps' own time
    (``step_seconds``: evaluation and checkpoints are not in it)."""
    window = [r for r in records if not r.get("final") and isinstance(r.get("step_seconds"), (int, float))]
    window = window[-RATE_WINDOW:]
    seconds = sum(r["step_seconds"] for r in window)
    if not window or seconds <= 0:
        return None
    return {"steps": len(window), "seconds": seconds,
            "steps_per_min": 60.0 * len(window) / seconds,
            "samples_per_s": sum(r.get("samples") or 0 for r in window) / seconds,
            "tokens_per_s": sum(r.get("tokens") or 0 for r in window) / seconds}


def _last(records: list[dict], key: str) -> dict | None:
    for r in reversed(records):
        if r.get(key) is not None:
            return {"step": steps_done(r), "value": r[key]}
    return None


def checkpoints(directory: Path, now: float) -> list[dict]:
    """The complete checkpoints in ``directory``, newest first. One whose trainer.json is missing or unreadable is
    listed with an ``error`` instead of its step and time."""
    found = []
    if not directory.is_dir():
        return found
    for d in directory.iterdir():
        m = CHECKPOINT_NAME.fullmatch(d.name)
        if not m or not d.is_dir():
            continue  # .tmp-step-* is a checkpoint being written (or abandoned by a crash)
        entry = {"name": d.name, "path": str(d), "step": int(m.group(1))}
        try:
            state = json.loads((d / "trainer.json").read_text(encoding="utf-8"))
            if not (isinstance(state, dict) and isinstance(state.get("time"), (int, float))):
                raise ValueError("no 'time' in it")
            entry.update(step=int(state.get("step", entry["step"])), time=float(state["time"]),
                         age_s=now - float(state["time"]), reason=str(state.get("reason", "?")))
        except FileNotFoundError:
            entry["error"] = "trainer.json missing"
        except (OSError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
            entry["error"] = f"trainer.json unreadable ({exc.__class__.__name__}: {exc})"
        found.append(entry)
    return sorted(found, key=lambda e: e["step"], reverse=True)


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StatusError(f"{path}: not valid YAML ({exc})") from None
    return cfg if isinstance(cfg, dict) else {}


def _last_eval(records: list[dict]) -> dict | None:
    """The newest evaluation: ``{"step", "sets": {set: {metric: value}}}`` (``eval/<set>/<metric>`` keys)."""
    rec = next((r for r in reversed(records) if "eval_accuracy" in r), None)
    return None if rec is None else {"step": steps_done(rec), "sets": nest(rec)}


def run_status(run_dir: str | Path, now: float | None = None) -> dict:
    """Everything the run dir says (no network)."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    if not run_dir.is_dir():
        raise StatusError(f"run dir {run_dir} does not exist")
    log = run_dir / "metrics.jsonl"
    if not log.is_file() and not (run_dir / "config.yaml").is_file():
        raise StatusError(f"run dir {run_dir} holds no chorus run (no config.yaml, no metrics.jsonl)")
    cfg = _config(run_dir)
    total = (cfg.get("train") or {}).get("steps")
    ckpt_dir = Path((cfg.get("checkpoint") or {}).get("dir") or run_dir / "checkpoints")
    records = read_records(log) if log.is_file() else []
    done = steps_done(records[-1]) if records else 0
    r = rates(records)
    remaining = total - done if isinstance(total, int) else None
    finished = (run_dir / "summary.json").is_file() or any(rec.get("final") for rec in records)
    ckpts = checkpoints(ckpt_dir, now)
    return {
        "run_dir": str(run_dir),
        "steps_done": done,
        "steps_total": total,
        "percent": 100.0 * done / total if isinstance(total, int) and total > 0 else None,
        "finished": finished,
        "rates": r,
        "eta_s": 60.0 * remaining / r["steps_per_min"] if r and remaining and not finished else None,
        "reward_mean": _last(records, "reward_mean"),
        "eval_accuracy": _last(records, "eval_accuracy"),
        "eval": _last_eval(records),
        "checkpoint_dir": str(ckpt_dir),
        "checkpoints": ckpts,
        "newest_checkpoint": next((c for c in ckpts if "error" not in c), None),
    }


# --- the endpoint -------------------------------------------------------------------------------------------------

def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_S, now: float | None = None) -> dict:
    """The live counters of a run's /metrics. ``live`` is False (with ``error``) when it does not answer in time."""
    from prometheus_client.parser import text_string_to_metric_families

    now = time.time() if now is None else now
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8")
    except (OSError, ValueError) as exc:  # URLError, timeouts and refused connections are OSErrors
        return {"url": url, "live": False, "error": str(getattr(exc, "reason", exc))}
    samples: dict[str, list] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault(s.name, []).append((s.labels, s.value))
    except ValueError as exc:
        return {"url": url, "live": False, "error": f"answers, but not with Prometheus text ({exc})"}

    def by(name: str, label: str) -> dict[str, float]:
        return {labels.get(label, ""): value for labels, value in samples.get(name, [])}

    def one(name: str) -> float | None:
        values = [v for _, v in samples.get(name, [])]
        return values[0] if values else None

    ckpt_time = one("chorus_checkpoint_timestamp_seconds")
    step = one("chorus_step")
    return {
        "url": url, "live": True,
        "step": int(step) if step is not None else None,
        "checkpoint_step": int(one("chorus_checkpoint_step") or 0),
        "checkpoint_age_s": now - ckpt_time if ckpt_time else None,
        "restarts": by("chorus_actor_restarts_total", "role"),
        "deadlines_exceeded": by("chorus_deadline_exceeded_total", "role"),
        "reward_failures": by("chorus_reward_failures_total", "reward"),
        "dropped_groups": one("chorus_reward_dropped_groups_total"),
    }


def endpoint_of(run_dir: Path) -> str | None:
    path = run_dir / "metrics_url"
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


def status(run_dir: str | None = None, url: str | None = None, now: float | None = None) -> dict:
    """The run dir's status (if given) with ``endpoint``: a scrape of ``url``, else of the run's metrics_url."""
    if not run_dir and not url:
        raise StatusError("give a run dir, or --url of a run's metrics endpoint")
    now = time.time() if now is None else now
    out = run_status(run_dir, now) if run_dir else {}
    url = url or endpoint_of(Path(run_dir))
    out["endpoint"] = scrape(url, now=now) if url else {"url": None, "live": False,
                                                       "error": "no metrics_url in the run dir"}
    return out


# --- text ---------------------------------------------------------------------------------------------------------

def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _counts(values: dict[str, float], order: tuple[str, ...] = ()) -> str:
    keys = [k for k in order if k in values] + sorted(k for k in values if k not in order)
    return ", ".join(f"{k} {values[k]:g}" for k in keys) or "none"


def format_status(s: dict) -> str:
    lines = []
    if "run_dir" in s:
        total = s["steps_total"]
        progress = f"step {s['steps_done']} / {total if total is not None else '?'}"
        if s["percent"] is not None:
            progress += f" ({s['percent']:.1f}%)"
        lines += [f"run         {s['run_dir']}",
                  f"progress    {progress}, {'finished' if s['finished'] else 'not finished'}"]
        r = s["rates"]
        if r:
            rate = (f"{r['steps_per_min']:.2f} steps/min, {r['samples_per_s']:.2f} samples/s, "
                    f"{r['tokens_per_s']:.1f} tokens/s (last {r['steps']} steps, their own time)")
            if s["eta_s"] is not None:
                rate += f"; ETA {_age(s['eta_s'])}"
            lines.append(f"rate        {rate}")
        for key, name in (("reward_mean", "reward"), ("eval_accuracy", "eval acc")):
            v = s[key]
            lines.append(f"{name:<12}{v['value']:.4f} (after step {v['step']})" if v else f"{name:<12}-")
        if s.get("eval") and s["eval"]["sets"]:
            for name, m in s["eval"]["sets"].items():
                extra = "".join(f", {k} {m[k]:.3f}" for k in m if k.startswith("pass@"))
                tokens = f", {m['response_tokens']:.1f} tokens" if "response_tokens" in m else ""
                lines.append(f"  {name:<10}accuracy {m.get('accuracy', float('nan')):.3f}{extra}{tokens}")
        ckpts, newest = s["checkpoints"], s["newest_checkpoint"]
        if newest:
            lines.append(f"checkpoint  {newest['name']}: {newest['reason']}, written {_age(newest['age_s'])} ago "
                         f"({len(ckpts)} in {s['checkpoint_dir']})")
        else:
            lines.append(f"checkpoint  none complete in {s['checkpoint_dir']}")
        lines += [f"            {c['name']}: {c['error']}" for c in ckpts if "error" in c]
    e = s["endpoint"]
    if not e["live"]:
        lines.append(f"endpoint    {e['url'] or '-'} does not answer (run not live): {e['error']}")
        return "\n".join(lines)
    lines.append(f"endpoint    {e['url']} live, step {e['step']}")
    if "run_dir" not in s:
        age = f", written {_age(e['checkpoint_age_s'])} ago" if e["checkpoint_age_s"] is not None else ""
        lines.append(f"checkpoint  step {e['checkpoint_step']}{age}")
    lines += [f"restarts    {_counts(e['restarts'], ROLES)}",
              f"deadlines   {_counts(e['deadlines_exceeded'], ROLES)}",
              f"reward failures  {_counts(e['reward_failures'])}"
              + (f"; dropped groups {e['dropped_groups']:g}" if e["dropped_groups"] else "")]
    return "\n".join(lines)


def main(run_dir: str | None, url: str | None, as_json: bool) -> int:
    """Print the status; 1 when only an endpoint was asked for and it does not answer."""
    s = status(run_dir, url)
    print(json.dumps(s, indent=2) if as_json else format_status(s), flush=True)
    return 1 if not run_dir and not s["endpoint"]["live"] else 0
