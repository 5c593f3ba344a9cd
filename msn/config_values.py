"""Config values as plain data (docs/security.md): the JSON/YAML form of a typed config, and
strings escaped so that OmegaConf never resolves them. Schema-free, so both the training and
the evaluation configs use it."""

from __future__ import annotations

import dataclasses
import re
from typing import Any


def plain_dict(typed: Any) -> dict[str, Any]:
    """Plain-container form (JSON/YAML friendly, tuples as lists) of a typed config dataclass:
    its values as they are (a typed config holds no interpolation left to resolve; a ``${...}``
    in it is literal text, never resolved again)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return [plain(item) for item in value] if isinstance(value, (list, tuple)) else value

    return plain(dataclasses.asdict(typed))


def literal(value: Any) -> Any:
    """``value`` with every string escaped so that OmegaConf reads it as the same literal text:
    ``${`` (and the backslashes before it) can no longer start an interpolation."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda match: match.group(1) * 2 + "\\${", value)
    if isinstance(value, dict):
        return {key: literal(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [literal(item) for item in value]
    return value
