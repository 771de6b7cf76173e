"""The model name a request names, checked once where the request enters.

One rule for every API (headswap.v1, KServe V2, and so the health entries, which exist only for
loaded registry models): the registry's `check_model_name`. A name outside it (`../x`, `a/`,
`./a`, NUL bytes, 300 characters) can never be an alias of a stored model, never reaches a path,
a load, a health entry or a metric label. The registry checks again for its other callers.
"""

from __future__ import annotations

from headswap.errors import NotFound, shown_name
from headswap.registry.registry import NAME_PATTERN, check_model_name


def requested_model(name: str, default: str = "") -> str:
    """headswap.v1: the model a request names ("" = `default`); INVALID_ARGUMENT outside the rule."""
    return check_model_name(name or default)


def known_model(name: str, default: str = "") -> str:
    """KServe V2: a name outside the rule is an unknown model (NOT_FOUND), as Triton answers."""
    name = name or default
    if not NAME_PATTERN.match(name):
        raise NotFound(f"unknown model {shown_name(name)}: model names are 1-63 lowercase letters, digits, "
                       "'.', '_' or '-', starting with a letter or digit")
    return name
