"""Records that may leave the process tree round-trip through msgpack unchanged (no pickle)."""

from __future__ import annotations

from dataclasses import asdict

import msgpack

from rollout.types import Completion, Scored, from_msgpack, to_msgpack


def test_completion_and_scored_round_trip_through_msgpack():
    c = Completion(prompt_index=3, token_ids=[5, 2], logprobs=[-0.25, -1.5], text="ba", finish_reason="stop")
    s = Scored(total=0.75, components={"exact_match": 1.0, "len": -0.25}, failed=["judge"])
    for record in (c, s):
        data = to_msgpack(record)
        assert msgpack.unpackb(data, raw=False) == asdict(record)  # plain msgpack of the fields, no pickle
        assert from_msgpack(type(record), data) == record
