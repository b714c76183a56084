"""Fixtures for the dashboard's tests: the fake source, and (for the live tests) the integration suite's
fresh, migrated PostgreSQL database per test and its ``caracal`` CLI runner."""

from __future__ import annotations

import pytest

from caracal_tui.fake import FakeSource
from tests.integration.conftest import cli, database_url, db, migrated_template  # noqa: F401 - fixtures


@pytest.fixture
def fake() -> FakeSource:
    return FakeSource()
