"""The README stays true: its config reference lists every schema key, its metrics table every metric."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from actors.config import ChorusConfig
from actors.metrics import Metrics

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _keys(cls, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub) and key != "data.synthetic":
            out += _keys(sub, key + ".")
        else:
            out.append(key)
    return out


def test_config_reference_lists_every_schema_key():
    keys = set(_keys(ChorusConfig))
    section = README.split("## Config reference")[1].split("\n## ")[0]
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_.]+)` \|", section, flags=re.M))
    # "| `critic.*` | as `learner.*` |": a section of the same schema as one documented key by key
    hints = typing.get_type_hints(ChorusConfig)
    for alias, like in re.findall(r"^\| `([a-z_]+)\.\*` \| as `([a-z_]+)\.\*` \|", section, flags=re.M):
        assert hints[alias] is hints[like], f"README: {alias}.* is documented as {like}.*, but their schemas differ"
        documented |= {f"{alias}.{k}" for k in _keys(hints[like]) if f"{like}.{k}" in documented}
    assert keys - documented == set(), "keys missing from the README's config reference"
    assert documented - keys == set(), "README documents keys the schema does not have"


def test_metrics_table_lists_every_metric_and_endpoint_binds_loopback():
    m = Metrics("127.0.0.1", 0)
    try:
        names = {metric.name for metric in m.registry.collect()}
        assert m.server.server_address[0] == "127.0.0.1"
    finally:
        m.close()
    documented = set(re.findall(r"^\| `(chorus_[a-z_]+)", README, flags=re.M))
    # prometheus_client reports counters without their _total suffix
    exported = {n if n in documented else f"{n}_total" for n in names}
    assert exported == documented
