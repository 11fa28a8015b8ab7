"""Validate produced resources against the FHIR models of fhir.resources.

careloop speaks FHIR R4. fhir.resources 8 ships R5 (default) and R4B models but no R4; every
element careloop writes has the same name, type and cardinality in R4 and R4B, so the R4B models
check R4 output. (Nothing R4B- or R5-only is written: no Appointment.cancellationReason change,
no R5 Encounter.class list, no CodeableReference.)

A resource that fails is not dropped: the failing element is removed, a warning names it, and the
resource is checked again (a few rounds at most). Only a resource that still fails, a careloop
defect, raises :class:`mappings.errors.ResourceValidationError`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from mappings.errors import ResourceValidationError

__all__ = ["validate_resource", "validate_resources"]

JSON = dict[str, Any]
_MAX_ROUNDS = 6


@cache
def _model(resource_type: str) -> Any:
    # loading the models costs about a second; only validation should pay it
    from fhir.resources.R4B import get_fhir_model_class  # noqa: PLC0415

    return get_fhir_model_class(resource_type)


def validate_resource(resource: JSON) -> list[str]:
    """The problems fhir.resources (R4B models) finds in ``resource``; empty when valid."""
    try:
        model = _model(resource["resourceType"])
    except (KeyError, ValueError) as exc:
        return [f"unknown resourceType: {exc}"]
    try:
        model.model_validate(resource)
    except ValueError as exc:  # pydantic.ValidationError, without importing pydantic
        return [f"{_path(e['loc'])}: {e['msg']}" for e in _errors(exc)]
    return []


def _errors(exc: ValueError) -> list[Any]:
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return [{"loc": (), "msg": str(exc)}]
    return list(errors())


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _drop(resource: JSON, loc: tuple[Any, ...]) -> bool:
    """Remove the element at ``loc``; False when the path does not lead anywhere."""
    # pydantic may add a type tag to the location (e.g. 'function-after[...]'); keep the data path
    keys = [k for k in loc if isinstance(k, int) or (isinstance(k, str) and "[" not in k)]
    node: Any = resource
    for key in keys[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return False
    last = keys[-1] if keys else None
    if last is None or last == "resourceType":
        return False
    try:
        if isinstance(node, list) and isinstance(last, int):
            node.pop(last)
        elif isinstance(node, dict) and last in node:
            del node[last]
        else:
            return False
    except (IndexError, KeyError):
        return False
    return True


def validate_resources(resources: list[JSON], warn: Callable[[str, str], None]) -> None:
    """Validate each resource in place, dropping unreadable elements with a warning."""
    for resource in resources:
        model = _model(resource["resourceType"])
        for _ in range(_MAX_ROUNDS):
            try:
                model.model_validate(resource)
                break
            except ValueError as exc:
                errors = _errors(exc)
                dropped = False
                # drop from the deepest location first so list indexes stay right
                for err in sorted(errors, key=lambda e: len(e["loc"]), reverse=True):
                    if _drop(resource, err["loc"]):
                        dropped = True
                        warn(
                            f"{resource['resourceType']}/{resource['id']}",
                            f"{_path(err['loc'])} {err['msg'].lower()}; left out",
                        )
                        break
                if not dropped:
                    raise ResourceValidationError(
                        f"{resource['resourceType']}/{resource['id']} does not validate: "
                        + "; ".join(f"{_path(e['loc'])}: {e['msg']}" for e in errors[:3])
                    ) from None
        else:
            problems = validate_resource(resource)
            if problems:
                raise ResourceValidationError(
                    f"{resource['resourceType']}/{resource['id']} does not validate: "
                    + "; ".join(problems[:3])
                )
