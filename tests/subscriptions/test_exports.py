"""The public surfaces of `subscriptions` and `adapters.fhir` are deliberate: everything in
`__all__` exists and is documented, and nothing private leaks (as httpx's
tests/test_exported_members.py checks)."""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest

import adapters.fhir
import subscriptions


@pytest.mark.parametrize("module", [subscriptions, adapters.fhir])
def test_all_names_exist_and_are_documented(module: ModuleType) -> None:
    """Each exported name resolves; classes and functions carry a docstring."""
    assert module.__doc__
    for name in module.__all__:
        assert not name.startswith("_")
        member = getattr(module, name)
        if inspect.isclass(member) or inspect.isfunction(member):
            assert inspect.getdoc(member), f"{module.__name__}.{name} has no docstring"


@pytest.mark.parametrize("module", [subscriptions, adapters.fhir])
def test_public_members_are_exported(module: ModuleType) -> None:
    """Public classes and functions defined in the package are in __all__."""
    defined = {name for name, member in vars(module).items()
               if not name.startswith("_") and (inspect.isclass(member)
                                                or inspect.isfunction(member))
               and getattr(member, "__module__", "").startswith(module.__name__)}
    assert defined <= set(module.__all__)
