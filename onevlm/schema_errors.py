"""pydantic's validation errors as one line for the person who wrote the YAML (configuration, model cards).

Both files are validated by pydantic models; what a person needs is the first problem, where it is
(``destinations[1].port``) and how many more there are, not pydantic's report.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from pydantic import ValidationError


class KeyProblem(ValueError):
    """A rule on a whole mapping that blames one of its keys (``key`` joins the error's path)."""

    def __init__(self, key: str, problem: str):
        super().__init__(problem)
        self.key = key


def error_path(loc: tuple[Any, ...]) -> str:
    """``("destinations", 1, "port")`` as ``destinations[1].port`` (the whole document: ``<document>``)."""
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    return where or "<document>"


def first_error(exc: ValidationError, wording: Mapping[str, str],
                unknown: Callable[[tuple[Any, ...]], str] | None = None) -> tuple[str, str]:
    """The error to show, as ``(path, problem)``; the problem ends with how many more there are.

    An unknown key comes first: it is usually a misspelt one, which explains the errors after it.

    Args:
        exc: pydantic's error.
        wording: pydantic error types worded for people (``"missing": "is required"``).
        unknown: words an unknown key at ``loc`` (e.g. naming the close match); default: ``wording``.
    """
    errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
    first = errors[0]
    loc, cause = tuple(first["loc"]), (first.get("ctx") or {}).get("error")
    if isinstance(cause, KeyProblem):
        loc += (cause.key,)
    if isinstance(cause, ValueError):
        problem = str(cause)
    elif first["type"] == "extra_forbidden" and unknown is not None:
        problem = unknown(loc)
    else:
        problem = wording.get(first["type"], first["msg"])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return error_path(loc), problem + more
