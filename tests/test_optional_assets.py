"""The rule for optional assets (tests/conftest.py ``require_or_skip``): skip on a user's machine, fail in CI."""

from __future__ import annotations

import pytest

from conftest import in_ci, require_or_skip


def test_an_available_asset_lets_the_test_go_on(monkeypatch):
    monkeypatch.setenv("CI", "true")
    require_or_skip("/usr/bin/thing", "thing", "apt-get install thing")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_a_missing_asset_skips_with_the_reason_outside_ci(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match=r"^thing not installed \(apt-get install thing\)$"):
        require_or_skip(None, "thing", "apt-get install thing")


@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_a_missing_asset_fails_in_ci_with_one_line(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception) as failed:
        require_or_skip(None, "thing", "apt-get install thing")
    assert str(failed.value) == f"thing is required in CI (CI={value}) but missing; apt-get install thing"
    assert failed.value.pytrace is False  # the report shows that line, not a traceback
