"""Fixtures for the reliability tests: one small world of tiny artifacts built once per session."""

from __future__ import annotations

import pytest

from tests.helpers.reliability import World, build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return build_world(tmp_path_factory.mktemp("world"))
