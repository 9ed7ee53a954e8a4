"""actors/pools.py without a cluster: what each actor asks Ray to place."""

from __future__ import annotations

import pytest

from actors.config import ConfigError
from actors.pools import bundle


def test_zero_cpus_is_placed_only_with_a_gpu():
    assert bundle("learner", 0.0, 1.0) == {"CPU": 0.0, "GPU": 1.0}  # a GPU actor that reserves no CPU
    assert bundle("rollout", 0.5, 0) == {"CPU": 0.5, "GPU": 0}
    # Ray refuses a bundle of nothing ("Bundles cannot be an empty dictionary"): said at start with the key instead
    with pytest.raises(ConfigError, match=r"config key 'rollout.num_cpus': 0 reserves nothing for an actor without"):
        bundle("rollout", 0.0, 0)
