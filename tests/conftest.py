"""Test configuration: hypothesis profiles (HYPOTHESIS_PROFILE=quick|thorough) and shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from doubles import save_tiny_policy

settings.register_profile(
    "quick", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def no_shape_checks():
    """Turn the pytest-only jaxtyping/beartype shape checks off for the test: torch.compile traces ``core``
    with symbolic (dynamic) sizes, which the checker cannot match against concrete dims. Users never run
    with the checks on, so compiled tests run the code exactly as users do."""
    import jaxtyping

    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        yield
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A saved tiny random policy folder (``doubles.save_tiny_policy``), shared by every test that runs a CLI on it
    (read-only: runs write into their own runs folders)."""
    return save_tiny_policy(tmp_path_factory.mktemp("tiny") / "policy")
