"""The scale test runs only when asked for: ``make test-scale`` (``pytest -m scale``).

``pyproject.toml`` deselects it by default (``addopts = -m "not scale"``). A command line that
replaces that ``-m`` with another expression (``pytest -m postgres``) would select it again;
this hook skips it then, unless the expression names ``scale`` itself.
"""

from __future__ import annotations

import re

import pytest

_ASKED = re.compile(r"(?<!not )\bscale\b")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    expression = str(config.getoption("markexpr", "") or "")
    if _ASKED.search(expression):
        return
    skip = pytest.mark.skip(reason="the scale-out test runs with `make test-scale` "
                                   "(pytest -m scale), a few minutes")
    for item in items:
        if item.get_closest_marker("scale") is not None:
            item.add_marker(skip)
