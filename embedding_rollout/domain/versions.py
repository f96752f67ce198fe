"""Model version labels: ``v<N>`` at the system boundary, the integer ``N`` in TF Serving."""
from __future__ import annotations

import re

_LABEL = re.compile(r"^v([1-9][0-9]{0,8})$")


class InvalidVersion(ValueError):
    """A string that is not a model version label such as ``v2``."""


def parse_version(label: str) -> int:
    """Return the TF Serving integer version of a label like ``v2``."""
    match = _LABEL.match(label) if isinstance(label, str) else None
    if not match:
        raise InvalidVersion(f"invalid model version {label!r}: expected 'v' followed by a positive integer, e.g. 'v2'")
    return int(match.group(1))


def version_label(number: int) -> str:
    if not isinstance(number, int) or number < 1:
        raise InvalidVersion(f"invalid model version number {number!r}: expected a positive integer")
    return f"v{number}"


def is_version(label: object) -> bool:
    return isinstance(label, str) and bool(_LABEL.match(label))


def version_key(label: str) -> int:
    """Sort key: versions order by their number, not lexically (v10 after v9)."""
    return parse_version(label)
