"""ops/ stays true to the code: every metric the alerts and the dashboard query is one the driver exports, every
alert has its runbook section, and the Kubernetes manifest, the image and configs/cluster_7b.yaml agree (the config
loads, its actors fit the GPUs the RayJob declares, pods outlive the checkpoint grace, the metrics port is exposed).
Nothing here needs a cluster: the files are parsed, not applied."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from actors.config import load_config
from actors.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
ALERTS = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
RULES = [r for g in ALERTS["groups"] for r in g["rules"]]
DASHBOARD = json.loads((OPS / "grafana" / "chorus-dashboard.json").read_text())
RUNBOOK = (OPS / "RUNBOOK.md").read_text()
K8S = list(yaml.safe_load_all((OPS / "k8s" / "rayjob.yaml").read_text()))
RAYJOB = next(d for d in K8S if d and d["kind"] == "RayJob")
DOCKERFILE = (OPS / "Dockerfile").read_text()


@pytest.fixture(autouse=True)
def _root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the image runs chorus from the repository root; config paths are relative to it


# --- metric names ---------------------------------------------------------------------------------------------

def exported_names() -> set[str]:
    m = Metrics("127.0.0.1", 0)
    try:  # prometheus_client reports a counter by its name without _total; the exposition has the _total
        return {f"{f.name}_total" if f.type == "counter" else f.name for f in m.registry.collect()}
    finally:
        m.close()


_NOT_METRICS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
                "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers, range selectors,
    label lists (`by (...)`), functions (a name before `(`), keywords and numbers are taken out."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", e)
    return set(names) - _NOT_METRICS


def unknown_names(exprs: list[str], known: set[str]) -> set[str]:
    return set().union(*(metric_names(e) for e in exprs)) - known - {"up"}  # up: Prometheus's own, per target


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]
    for var in DASHBOARD["templating"]["list"]:  # label_values(METRIC, label)
        exprs += re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)", json.dumps(var.get("query", "")))
    return exprs


def test_metric_name_extraction():
    expr = ('sum by (job, role) (increase(chorus_x_total{role="a", x=~"$v"}[$__rate_interval])) / ignoring(role) '
            'group_left sum(rate(chorus_y[5m] offset 30m)) > 1e-3 and time() - chorus_z > 3 * 3600 or up == 0')
    assert metric_names(expr) == {"chorus_x_total", "chorus_y", "chorus_z", "up"}
    # a typo'd name is reported, a known one is not
    known = exported_names()
    assert unknown_names(["changes(chorus_stpe[20m]) == 0", "chorus_step > 1"], known) == {"chorus_stpe"}


def test_alerts_and_dashboard_query_only_exported_metrics():
    known = exported_names()
    assert {"chorus_step", "chorus_actor_restarts_total", "chorus_reward_mean"} <= known
    assert unknown_names([r["expr"] for r in RULES], known) == set(), "alerts.yml"
    assert unknown_names(dashboard_exprs(), known) == set(), "chorus-dashboard.json"


# --- alerts and runbook ---------------------------------------------------------------------------------------

def github_anchors(markdown: str) -> list[str]:
    """Heading anchors as GitHub makes them: lower case, punctuation but `-` and `_` dropped, spaces to `-`, and
    -1, -2, ... on repeats. Lines in fenced code blocks are not headings."""
    anchors, seen, fenced = [], {}, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            anchors.append(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_github_anchors():
    assert github_anchors("# A b\n```\n# not\n```\n## `x.y` and (z)\n# A b\n") == ["a-b", "xy-and-z", "a-b-1"]


def test_every_alert_is_complete_and_has_its_runbook_section():
    anchors = set(github_anchors(RUNBOOK))
    names = [r["alert"] for r in RULES]
    assert len(names) == len(set(names)) >= 9
    for r in RULES:
        assert {"alert", "expr", "for", "labels", "annotations"} <= r.keys(), r.get("alert")
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        a = r["annotations"]
        assert a["summary"].strip() and a["description"].strip(), r["alert"]
        page, _, anchor = a["runbook_url"].partition("#")
        assert page == "ops/RUNBOOK.md" and anchor in anchors, f"{r['alert']}: no section #{anchor} in RUNBOOK.md"
    # ... and the runbook has no alert section without its alert
    alerts_part = RUNBOOK.split("\n## Alerts")[1]
    assert set(re.findall(r"^### (\w+)$", alerts_part, flags=re.M)) == set(names)


def test_the_alerts_cover_what_ops_asked_for():
    text = {r["alert"]: r["expr"] for r in RULES}
    joined = "\n".join(text.values())
    for metric in ("chorus_step", 'chorus_reward_mean{component="total"}', "chorus_kl", "chorus_ref_kl",
                   "chorus_actor_restarts_total", "chorus_reward_failures_total", "chorus_samples_generated_total",
                   "chorus_deadline_exceeded_total", "chorus_checkpoint_timestamp_seconds", "chorus_mismatch_kl",
                   "chorus_env_failures_total", "chorus_env_episodes_total", "up{"):
        assert metric in joined, metric
    assert "by (job, instance, run, role)" in text["ChorusActorRestarts"]  # one alert per role


def test_runbook_links_resolve():
    anchors = set(github_anchors(RUNBOOK))
    for target in re.findall(r"\]\(#([^)]+)\)", RUNBOOK):
        assert target in anchors, target
    for path in re.findall(r"`((?:ops|configs)/[\w./-]+\.(?:ya?ml|json|md|sh))`", RUNBOOK):
        assert (ROOT / path).is_file(), path


def test_prometheus_config_loads_the_alerts_and_scrapes_the_config_port():
    prom = yaml.safe_load((OPS / "prometheus" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"] and (OPS / "prometheus" / "alerts.yml").is_file()
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert all(re.fullmatch(r"chorus.*", name) for name in jobs)  # what ChorusTargetDown's up{job=~"chorus.*"} matches
    assert 'up{job=~"chorus.*"}' in next(r["expr"] for r in RULES if r["alert"] == "ChorusTargetDown")
    port = load_config("configs/cluster_7b.yaml").metrics.port
    assert jobs["chorus"]["static_configs"][0]["targets"] == [f"localhost:{port}"]


# --- dashboard ------------------------------------------------------------------------------------------------

def test_dashboard_model():
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = DASHBOARD["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]


def test_dashboard_shows_what_ops_asked_for():
    exprs = "\n".join(dashboard_exprs())
    for metric in ("chorus_step", "chorus_reward_mean", "chorus_loss", "chorus_mu", "chorus_kl", "chorus_ref_kl",
                   "chorus_entropy", "chorus_clip_fraction", "chorus_grad_norm", "chorus_learning_rate",
                   "chorus_response_length_tokens", "chorus_eval_accuracy", "chorus_step_phase_seconds",
                   "chorus_queue_depth", "rate(chorus_samples_generated_total", "rate(chorus_tokens_generated_total",
                   "chorus_weight_sync_bytes_total", "chorus_weight_sync_seconds", "chorus_actor_restarts_total",
                   "chorus_deadline_exceeded_total", "chorus_reward_failures_total",
                   "chorus_reward_dropped_groups_total", "chorus_data_rows_skipped_total", "chorus_checkpoint_step",
                   "time() - chorus_checkpoint_timestamp_seconds", "chorus_mismatch_kl", "chorus_is_outside_fraction",
                   "chorus_is_ratio_mean", "chorus_is_weight_mean", "chorus_dual_clip_fraction",
                   "chorus_filtered_groups_total", "chorus_sample_rounds", "chorus_truncated_responses_total",
                   "chorus_env_turns", "chorus_env_return", "chorus_env_reward_per_turn", "chorus_env_events_total",
                   "chorus_env_failures_total", "chorus_env_latency_seconds", 'phase="env"'):
        assert metric in exprs, metric
    stacked = [p for p in DASHBOARD["panels"] if "chorus_step_phase_seconds" in json.dumps(p.get("targets"))
               and p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"]
    assert stacked, "phase seconds are stacked"


# --- the cluster config, the RayJob and the image -------------------------------------------------------------

def _pods() -> list[tuple[str, int, dict]]:
    """(group, replicas, pod spec) of the head and each worker group."""
    spec = RAYJOB["spec"]["rayClusterSpec"]
    return [("head", 1, spec["headGroupSpec"]["template"]["spec"])] + [
        (g["groupName"], g["replicas"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


def _entrypoint() -> tuple[str, list[str]]:
    """(the directory it cds to, the chorus command's arguments)."""
    words = shlex.split(RAYJOB["spec"]["entrypoint"])
    assert words[0] == "cd" and "chorus" in words
    return words[1], words[words.index("chorus") + 1:]


def test_rayjob_runs_an_existing_config_with_resume_on_the_shared_volume():
    assert RAYJOB["apiVersion"] == "ray.io/v1"
    workdir, args = _entrypoint()
    assert re.search(rf"^WORKDIR {re.escape(workdir)}$", DOCKERFILE, flags=re.M), "cd to the image's repository"
    assert args[0] == "train" and "--resume" in args
    cfg = load_config(args[1])  # relative to the repository root, as in the image
    run_dir = args[args.index("--run-dir") + 1]
    assert run_dir.startswith("/ckpt/")
    assert cfg.checkpoint.dir == "" or cfg.checkpoint.dir.startswith("/ckpt/")  # storage every node sees
    assert cfg.rollout.sync_dir.startswith("/ckpt/")  # engines on other nodes than learner rank 0 read the weights
    spec = RAYJOB["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    for group, _, pod in _pods():
        assert pod["terminationGracePeriodSeconds"] > cfg.checkpoint.grace_s, group
        assert pod["securityContext"]["runAsNonRoot"] is True, group
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert claims[mounts["/ckpt"]] == "chorus-ckpt", group
        for path in (cfg.model.path, cfg.data.prompts, cfg.data.expert, cfg.data.eval):
            assert any(path.startswith(m + "/") for m in mounts), f"{group}: {path} is on no volume"


def test_rayjob_exposes_the_metrics_port_of_its_config():
    cfg = load_config(_entrypoint()[1][1])
    assert cfg.metrics.host == "0.0.0.0" and cfg.metrics.port > 0  # reachable from Prometheus, at a known port
    head = RAYJOB["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert ports["chorus-metrics"] == cfg.metrics.port
    assert head["metadata"]["annotations"]["prometheus.io/port"] == str(cfg.metrics.port)
    service = next(d for d in K8S if d and d["kind"] == "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "chorus-metrics"
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()


def test_cluster_config_fits_the_gpus_the_rayjob_declares():
    cfg = load_config("configs/cluster_7b.yaml")
    assert cfg.model.dtype == "bfloat16" and cfg.learner.zero_stage == 3 and cfg.rollout.backend == "vllm"
    assert cfg.learner.num_actors >= 8 and cfg.rollout.num_actors >= 2 and cfg.rollout.tensor_parallel_size >= 2
    assert cfg.reward.num_actors >= 2 and cfg.checkpoint.every >= 1
    gpus = [(int(pod["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)), replicas)
            for _, replicas, pod in _pods()]
    declared = sum(n * replicas for n, replicas in gpus)
    per_node = max(n for n, _ in gpus)
    needed = cfg.learner.num_actors * (cfg.learner.num_gpus or 1)
    needed += cfg.rollout.num_actors * cfg.rollout.tensor_parallel_size
    if cfg.algo.kl_coef > 0 and not cfg.reference.colocate:
        needed += cfg.reference.num_actors * (cfg.reference.num_gpus or 1)
    if cfg.algo.advantage == "gae":
        needed += cfg.critic.num_actors * (cfg.critic.num_gpus or 1)
    assert needed <= declared, f"the config needs {needed} GPUs, the RayJob declares {declared}"
    assert declared - needed < per_node, "a whole node's GPUs would sit idle"
    assert cfg.rollout.tensor_parallel_size <= per_node  # an engine's tensor-parallel group stays on one node
    # the header's sizing says the same
    assert f"total     {declared} GPUs" in Path("configs/cluster_7b.yaml").read_text()


def test_image_installs_the_cuda_stack_and_runs_as_a_user():
    assert re.search(r"^FROM .*nvidia/cuda", DOCKERFILE, flags=re.M) or "nvidia/cuda:" in DOCKERFILE
    assert re.search(r"^RUN CHORUS_DEVICE=cuda .*ops/install\.sh", DOCKERFILE, flags=re.M)
    user = re.findall(r"^USER (\S+)", DOCKERFILE, flags=re.M)
    assert user and user[-1] not in ("root", "0")
    pins = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
    ray_pin = next(p for p in pins if p.startswith("ray=="))
    assert f'"ray[default]=={ray_pin.split("==")[1]}"' in DOCKERFILE
    assert RAYJOB["spec"]["rayClusterSpec"]["rayVersion"] == ray_pin.split("==")[1]
    ignored = set(Path(".dockerignore").read_text().split())
    assert {".venv", "runs", ".git"} <= ignored
