"""The ``chorus`` command line.

    chorus train CONFIG.yaml [--run-dir DIR [--resume]] [key=value ...]
    chorus reward score NAME_OR_MODULE:FUNCTION FILE.jsonl [--args JSON]
    chorus env play NAME_OR_MODULE:CLASS FILE.jsonl (--actions FILE.jsonl | --model DIR) [--args JSON]
    chorus status RUN_DIR [--json] [--url URL]
    chorus eval MODEL_DIR CONFIG.yaml [--json] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import time
from pathlib import Path

from actors.config import ConfigError, load_config
from rollout.data import DataError


def _user_modules_importable() -> None:
    """A reward named `my_rewards:fn` is the user's module in the directory they run from, as with `python -m`."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))


def _train(args: argparse.Namespace) -> int:
    _user_modules_importable()
    cfg = load_config(args.config, args.overrides)  # every config error surfaces here, before anything starts
    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir: the run to continue")
    run_dir = Path(args.run_dir or Path("runs") / f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    from actors.driver import Stopped, Trainer

    def starting(*_):  # SIGTERM while the actors start: Trainer() stops what it started, and the run exits
        raise SystemExit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, starting)
    trainer = Trainer(cfg, run_dir, resume=args.resume)
    # preemption (Kubernetes, Slurm, `kill`): checkpoint within checkpoint.grace_s, then exit 143
    signal.signal(signal.SIGTERM, lambda *_: trainer.request_stop("SIGTERM"))
    start = f" from step {trainer.start_step}" if trainer.start_step else ""
    print(f"chorus: run dir {run_dir}{start}; metrics at {trainer.metrics.url}", flush=True)
    try:
        summary = trainer.run()
    except Stopped as stop:
        print(f"chorus: stopped by SIGTERM after step {stop.step}; checkpoint {stop.checkpoint}. Continue with: "
              f"chorus train {args.config} --run-dir {run_dir} --resume", flush=True)
        return 128 + signal.SIGTERM
    finally:
        trainer.close()
    print(f"chorus: final eval accuracy {summary['final_eval_accuracy']:.3f} after {summary['steps']} steps "
          f"in {summary['wall_seconds']:.0f}s; model in {summary['model']}", flush=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from actors.offline_eval import evaluate_model, format_results

    cfg = load_config(args.config, args.overrides)
    results = evaluate_model(cfg, args.model_dir)
    if args.json:
        print(json.dumps({"model": args.model_dir, "sets": {k: v for k, v in results.items() if k},
                          **results[""]}), flush=True)
    else:
        print(format_results(results, args.model_dir), flush=True)
    return 0


def _reward_score(args: argparse.Namespace) -> int:
    """Score a JSONL file of responses with one reward, locally: no training, no cluster (the judge starts a
    local Ray for its engine actor)."""
    import os

    from actors.config import RewardConfig, RewardFnConfig
    from rewards.actor import RewardActor
    from rewards.isolation import RewardCallError
    from rewards.registry import check_args
    from rollout.data import load_rows

    _user_modules_importable()
    fn_args = _json_args(args.args)
    cfg = RewardConfig(functions=[RewardFnConfig(name=args.reward, args=fn_args)], timeout_s=args.timeout)
    try:  # the cheap checks first: the reward's name and arguments, then the file; then models load
        check_args(args.reward, fn_args)
        rows = load_rows(args.file, "responses")
        actor = RewardActor(cfg)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    except (TypeError, FileNotFoundError, RewardCallError) as exc:  # its arguments, an encoder folder, its load
        raise ConfigError(f"--args: {exc}") from None
    try:
        _score_rows(actor, rows, args.batch)
    finally:
        actor.shutdown()
    if actor.hung_calls:  # a reward run in a thread that hung keeps the interpreter from exiting
        sys.stdout.flush()
        os._exit(0)
    return 0


def _score_rows(actor, rows: list[dict], batch: int) -> None:
    import json

    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        scored, _ = actor.score([r["prompt"] for r in chunk], [r["response"] for r in chunk],
                                [{k: v for k, v in r.items() if k != "response"} for r in chunk])
        for s in scored:
            out = {"score": s.total, "components": s.components}
            if s.failed:
                out["failed"] = s.failed
            print(json.dumps(out), flush=True)


def _json_args(text: str, flag: str = "--args") -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not a JSON object ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: not a JSON object")
    return value


def _env_play(args: argparse.Namespace) -> int:
    """Play an environment locally, without a cluster: against scripted actions (``--actions``) or a model
    (``--model``, the hf backend on this machine); one JSON line per episode on stdout. The environment runs in its
    own process, isolated as in training."""
    import json

    from rewards.env_worker import EnvWorker
    from rewards.envs import check_env_args
    from rewards.isolation import RewardCallError
    from rollout.data import load_rows

    _user_modules_importable()
    env_args = _json_args(args.args)
    try:
        check_env_args(args.env, env_args)
    except KeyError as exc:
        raise ConfigError(str(exc.args[0])) from None
    except TypeError as exc:
        raise ConfigError(f"--args: {exc}") from None
    rows = load_rows(args.file, "episodes")
    scripts = _action_scripts(args.actions, len(rows)) if args.actions else None
    try:
        worker = EnvWorker(args.env, env_args, timeout_s=args.timeout)
    except RewardCallError as exc:
        raise ConfigError(f"--args: {exc}") from None
    try:
        if scripts is not None:
            episodes = _play_script(worker, rows, scripts, args.max_turns)
        else:
            episodes = _play_model(worker, rows, args)
        for episode in episodes:
            print(json.dumps(episode), flush=True)
    finally:
        worker.shutdown()
    return 0


def _action_scripts(path: str, rows: int) -> list[list[str]]:
    """``--actions``: a JSONL file whose line i is the list of the model's turns (strings) for row i."""
    import json

    from rollout.data import DataError

    try:
        lines = [line for line in open(path, encoding="utf-8").read().splitlines() if line.strip()]
    except OSError as exc:
        raise DataError(f"{path}: cannot read the actions file ({exc.strerror or exc})") from None
    scripts = []
    for i, line in enumerate(lines, 1):
        try:
            script = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
        if not isinstance(script, list) or not all(isinstance(a, str) for a in script):
            raise DataError(f"{path}:{i}: a line must be a list of the model's turns (strings)")
        scripts.append(script)
    if len(scripts) != rows:
        raise DataError(f"{path}: {len(scripts)} action lists for {rows} rows: one line per row")
    return scripts


def _play_script(worker, rows: list[dict], scripts: list[list[str]], max_turns: int) -> list[dict]:
    """Each row's episode with its scripted turns (up to ``max_turns``), all rows' episodes stepped together."""
    keys = [f"script-{i}" for i in range(len(rows))]
    first, _ = worker.reset(keys, rows)
    episodes = [{"row": i, "transcript": [], "rewards": [], "info": {}, "error": s.error, "done": bool(s.error)}
                for i, s in enumerate(first)]
    for e, s in zip(episodes, first):
        if s.observation is not None:
            e["transcript"].append(s.observation)
    for turn in range(max_turns):
        live = [i for i, e in enumerate(episodes) if not e["done"] and turn < len(scripts[i])]
        if not live:
            break
        steps, _ = worker.step([keys[i] for i in live], [scripts[i][turn] for i in live])
        for i, s in zip(live, steps):
            e = episodes[i]
            e["transcript"].append({"role": "assistant", "content": scripts[i][turn]})
            if s.error:
                e["error"], e["done"] = s.error, True
                continue
            e["rewards"].append(s.reward)
            for k, v in s.info.items():
                e["info"][k] = e["info"].get(k, 0.0) + v
            if s.observation is not None:
                e["transcript"].append(s.observation)
            e["done"] = s.done
    open_keys = [keys[i] for i, e in enumerate(episodes) if not e["done"]]
    if open_keys:
        worker.close(open_keys)
    return [{**e, "return": sum(e["rewards"]), "turns": len([m for m in e["transcript"] if m["role"] == "assistant"])}
            for e in episodes]


def _play_model(worker, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """``--n`` episodes of each row against the model in ``--model`` (hf backend, float32, this process)."""
    from pathlib import Path as P

    from transformers import AutoTokenizer

    from actors.datasets import RunData, tokenize
    from actors.episodes import Limits, play
    from rollout.engine import HFBackend
    from rollout.types import SamplingSpec

    if not (P(args.model) / "config.json").is_file():
        raise ConfigError(f"--model: '{args.model}' is not a Hugging Face model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(args.model)
    # rendered as training renders them (a conversation's prompt becomes its rendered text); errors name file and row
    tokens = tokenize(RunData(prompts=rows, expert=[], eval_sets={}, paths={"prompts": args.file}), tok,
                      chat_template=args.chat_template, model=args.model)
    renderer, prompts = tokens.renderer, tokens.prompts
    engine = HFBackend(args.model, dtype="float32", seed=args.seed)
    max_len = engine.model.config.max_position_embeddings
    spec = SamplingSpec(n=args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    limits = Limits(max_turns=args.max_turns, max_tokens=args.max_tokens or max_len,
                    max_new_tokens=args.max_new_tokens, max_model_len=max_len)
    out = []
    for c in play(engine.generate, worker, rows, prompts, spec, renderer, limits):
        transcript, start = [], 0
        for end in range(1, len(c.token_ids) + 1):  # runs of the model's tokens and of the observations'
            if end == len(c.token_ids) or c.loss_mask[end] != c.loss_mask[start]:
                role = "assistant" if c.loss_mask[start] else "environment"
                transcript.append({"role": role, "content": tok.decode(c.token_ids[start:end],
                                                                      skip_special_tokens=role == "assistant")})
                start = end
        e = c.episode
        out.append({"row": c.prompt_index, "transcript": transcript, "rewards": e["rewards"], "info": e["info"],
                    "error": e["error"], "return": e["return"], "turns": e["turns"], "finish": c.finish_reason})
    return out


def _status(args: argparse.Namespace) -> int:
    from actors.status import StatusError, main as status_main

    try:
        return status_main(args.run_dir, args.url, args.json)
    except StatusError as exc:
        print(f"chorus: status: {exc}", file=sys.stderr)
        return 2


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of rows >= 1, got {text!r}")
    return value


def _tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens >= 0, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chorus", description="Mixed SFT + RL post-training on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a training job")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=10")
    train.add_argument("--run-dir", default="", help="where the config, metrics.jsonl, checkpoints and final/ go")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --run-dir from its newest complete checkpoint (from step 0 if it "
                            "has none and has logged no step); the config may change only in sizes, limits and "
                            "paths (see README)")
    train.set_defaults(func=_train)
    reward = sub.add_parser("reward", help="work on reward functions without a cluster")
    reward_sub = reward.add_subparsers(dest="reward_command", required=True)
    score = reward_sub.add_parser("score", help="score a JSONL file of responses; one JSON line per row on stdout")
    score.add_argument("reward", help="a registered name (exact_match, json_schema, ...) or module:function")
    score.add_argument("file", help="JSONL (or Parquet) rows with `prompt`, `response` and the fields the reward "
                                    "needs (answer, schema, tests, ...)")
    score.add_argument("--args", default="{}", help='keyword arguments of the reward as a JSON object, e.g. '
                                                    '\'{"lowercase": true}\'')
    score.add_argument("--timeout", type=_seconds, default=60.0, help="seconds per batch before the reward fails")
    score.add_argument("--batch", type=_batch_size, default=64, help="rows per reward call")
    score.set_defaults(func=_reward_score)
    env = sub.add_parser("env", help="work on environments without a cluster")
    env_sub = env.add_subparsers(dest="env_command", required=True)
    play = env_sub.add_parser("play", help="play episodes of an environment against scripted actions or a model; "
                                           "one JSON line per episode on stdout (transcript, rewards, return, info)")
    play.add_argument("env", help="a registered name (tools, guess) or module:Class")
    play.add_argument("file", help="JSONL (or Parquet, or a `datasets` directory) rows: `prompt` (text or messages) "
                                   "or `messages`, and the fields the environment reads (answer, ...)")
    how = play.add_mutually_exclusive_group(required=True)
    how.add_argument("--actions", default="", help="JSONL: line i is the list of the model's turns for row i")
    how.add_argument("--model", default="", help="a Hugging Face model directory to play (hf backend, float32)")
    play.add_argument("--args", default="{}", help="keyword arguments of the environment as a JSON object")
    play.add_argument("--max-turns", type=_batch_size, default=4, help="model turns per episode at most")
    play.add_argument("--max-new-tokens", type=_batch_size, default=32, help="--model: tokens per turn at most")
    play.add_argument("--max-tokens", type=_tokens, default=0, help="--model: response tokens per episode at most, "
                                                                "observations included (0 = the model's context)")
    play.add_argument("--n", type=_batch_size, default=1, help="--model: episodes per row")
    play.add_argument("--temperature", type=float, default=0.0, help="--model: 0 = greedy")
    play.add_argument("--seed", type=int, default=0, help="--model: sampling seed")
    play.add_argument("--chat-template", default="", help="--model: a Jinja chat template file in place of the "
                                                          "tokenizer's")
    play.add_argument("--timeout", type=_seconds, default=30.0, help="seconds per environment call before its "
                                                                     "episodes fail")
    play.set_defaults(func=_env_play)
    status = sub.add_parser("status", help="where a run is: progress, rates, checkpoints, live counters")
    status.add_argument("run_dir", nargs="?", default="", help="the run's --run-dir")
    status.add_argument("--url", default="", help="scrape this /metrics endpoint (default: RUN_DIR/metrics_url); "
                                                 "alone, without a run dir, report on the endpoint only")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(func=_status)
    ev = sub.add_parser("eval", help="evaluate a saved model on a config's held-out sets (no training): accuracy "
                                     "per set, pass@n with train.eval_samples=n, response length")
    ev.add_argument("model_dir", help="a Hugging Face model directory: a run's final/, a checkpoint's model/, "
                                      "models/base")
    ev.add_argument("config", help="YAML config whose data and rollout sections say what to evaluate and how")
    ev.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.eval_samples=8")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_eval)
    args, extra = parser.parse_known_args(argv)  # key=value overrides may come after --run-dir too
    unknown = [a for a in extra if "=" not in a or a.startswith("-") or args.command not in ("train", "eval")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"chorus: config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:
        print(f"chorus: data error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
