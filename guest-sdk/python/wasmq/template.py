"""`{{field}}` templates filled from a message's JSON body (dotted paths reach nested fields), as
the notifier plugins' configs use them: `"subject": "Welcome {{user.name}}"`. Same rules as the
Rust SDK's `template` module."""

import json
from typing import Any, List, Optional, Tuple


def render(template: str, data: Any) -> Tuple[str, List[str]]:
    """Fills every `{{ path }}`: strings go in as they are, other values as JSON; a missing field
    renders empty and is listed in the second item."""
    out, missing, rest = [], [], template
    while True:
        start = rest.find("{{")
        end = rest.find("}}", start + 2) if start >= 0 else -1
        if start < 0 or end < 0:
            break
        out.append(rest[:start])
        path = rest[start + 2:end].strip()
        value = _lookup(data, path)
        if value is None:
            missing.append(path)
        elif isinstance(value, str):
            out.append(value)
        else:
            out.append(json.dumps(value, separators=(",", ":")))
        rest = rest[end + 2:]
    out.append(rest)
    return "".join(out), missing


def recipient(template: str, data: Any) -> Optional[str]:
    """A recipient rendered from its template: None if a field it names is missing or it is
    blank (a notifier rejects such a message: retrying cannot give it a recipient)."""
    text, missing = render(template, data)
    text = text.strip()
    return text if not missing and text else None


def _lookup(data: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data
