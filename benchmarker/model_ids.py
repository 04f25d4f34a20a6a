"""Model ids by the Hub's rules: the one check every layer uses before an id names anything.

An id that passes (`org/name`) can be joined to a folder without leaving it, so it is safe as a
catalog key, a model-store path and a URL part.
"""

from __future__ import annotations

import re

# fullmatch, not `$`: `$` also matches before a trailing newline ("a/b\n" would pass).
_MODEL_ID_CHARS = re.compile(r"[A-Za-z0-9._-]+")
MODEL_ID_MAX_LEN = 96


def model_id_problem(value: object) -> str | None:
    """Why `value` is not a valid Hub model id ("org/name"), or None when it is.

    The Hub's rules: 1-96 characters of [A-Za-z0-9._-] with exactly one '/', no '..' or '--',
    and no part that starts or ends with '-' or '.'. Ids that pass can never name a path outside
    the folder they are joined to.
    """
    if not isinstance(value, str):
        return "must be a string like 'org/name'"
    if not value:
        return "must not be empty"
    if len(value) > MODEL_ID_MAX_LEN:
        return f"must be at most {MODEL_ID_MAX_LEN} characters"
    if value.count("/") != 1:
        return "must have the form 'org/name' (exactly one '/')"
    if ".." in value or "--" in value:
        return "must not contain '..' or '--'"
    for part in value.split("/"):
        if not part:
            return "must have a non-empty organisation and name"
        if not _MODEL_ID_CHARS.fullmatch(part):
            return "may only contain letters, digits, '.', '_' and '-'"
        if part[0] in "-." or part[-1] in "-.":
            return "parts must not start or end with '-' or '.'"
    return None


def is_valid_model_id(value: object) -> bool:
    return model_id_problem(value) is None
