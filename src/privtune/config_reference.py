"""The README's config reference, generated from the pydantic models' field descriptions.

``python -m privtune.config_reference`` rewrites the section between the two markers in
README.md; a test fails when the README and the models disagree, so the reference can
never drift from what the code accepts.
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from privtune.config import MethodSpec, StudyConfig

BEGIN = "<!-- config-reference:begin (python -m privtune.config_reference) -->"
END = "<!-- config-reference:end -->"
HEADER = "| field | type | default | meaning |\n|---|---|---|---|"


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return f"Literal[{', '.join(repr(a) for a in args)}]"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "None" if annotation is type(None) else annotation.__name__


def _nested_model(annotation) -> type[BaseModel] | None:
    candidates = typing.get_args(annotation) or (annotation,)
    return next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        nested = _nested_model(info.annotation)
        if nested is not None and typing.get_origin(info.annotation) is not list:
            rows += _rows(nested, f"{prefix}{name}.")
            continue
        if info.is_required():
            default = "required"
        else:
            value = info.default_factory() if info.default is PydanticUndefined else info.default
            default = f"`{json.dumps(value)}`"
        rows.append(f"| `{prefix}{name}` | {_type_name(info.annotation)} | {default} | {info.description or ''} |")
    return rows


def reference() -> str:
    """The Markdown section: study fields, then the fields of one ``methods`` entry."""
    return "\n".join([
        HEADER, *_rows(StudyConfig), "",
        "Each entry of `methods` (the nested settings apply to the methods that use them):", "",
        HEADER, *_rows(MethodSpec)])


def _replace(readme: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {BEGIN} ... {END} section")
    return pattern.sub(lambda _: f"{BEGIN}\n{reference()}\n{END}", readme)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("README.md")
    path.write_text(_replace(path.read_text()))
    print(f"config reference written to {path}")


if __name__ == "__main__":
    main()
