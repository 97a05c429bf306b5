"""Fixtures shared by the reward-backend tests."""

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """Ray is slow to start: once per module, small, no dashboard."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
