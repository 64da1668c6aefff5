"""The step reference (docs/steps.md), generated from the registered steps' config models, so the page
cannot drift from the code: `compressor steps --markdown > docs/steps.md`, checked by tests/test_docs.py."""

from __future__ import annotations

import json
from typing import Any

HEADER = """# Steps

The steps a recipe's `steps:` list can use, with every field of their `with:` block. Generated from the
steps' config models by `compressor steps --markdown` (only compressor's own steps; an installed plugin's
steps are listed by `compressor steps`). `compressor steps NAME` prints one step in the terminal, and
`compressor schema` the JSON Schema of a whole recipe.
"""


def step_details(cls: Any) -> dict[str, Any]:
    """A step class as plain data: its formats, needs and each config field's type, default and bounds."""
    schema = cls.Config.model_json_schema()
    fields = {}
    for name, prop in schema.get("properties", {}).items():
        info = {k: prop[k] for k in ("type", "default", "description", "minimum", "maximum", "exclusiveMinimum",
                                     "exclusiveMaximum", "enum") if k in prop}
        if "type" not in info and "anyOf" in prop:
            info["type"] = " | ".join(str(a.get("type", a.get("$ref", "?"))) for a in prop["anyOf"])
        if "type" not in info and "enum" not in info and "$ref" in prop:
            ref = schema.get("$defs", {}).get(prop["$ref"].split("/")[-1], {})
            info.update({k: ref[k] for k in ("enum", "type") if k in ref})
        info["required"] = name in schema.get("required", [])
        fields[name] = info
    return {"name": cls.name, "summary": cls.summary, "version": cls.version, "accepts": list(cls.accepts),
            "produces": cls.produces, "needs_data": list(cls.needs_data), "requires": list(cls.requires),
            "deterministic": cls.deterministic, "config": fields}


def field_kind(info: dict[str, Any]) -> str:
    """A field's type as a reader writes it: the enum's values, or the JSON type."""
    return "|".join(map(str, info["enum"])) if "enum" in info else str(info.get("type", "any"))


def field_bounds(info: dict[str, Any]) -> str:
    """A field's numeric bounds, e.g. `minimum=1 maximum=64`, or ''."""
    return " ".join(f"{k}={info[k]}" for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
                    if k in info)


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def steps_markdown(steps: dict[str, Any]) -> str:
    """The reference page for `steps` (name → step class), in name order."""
    lines = [HEADER]
    for name in sorted(steps):
        d = step_details(steps[name])
        lines += [f"## `{name}`", "", d["summary"], "",
                  f"Formats: {' | '.join(d['accepts'])} → {d['produces']}."
                  + (f" Needs data: {', '.join(d['needs_data'])}." if d["needs_data"] else "")
                  + (f" Needs the modules: {', '.join(d['requires'])}." if d["requires"] else ""), ""]
        if not d["config"]:
            lines += ["No fields.", ""]
            continue
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        for field, info in d["config"].items():
            default = "required" if info["required"] else f"`{json.dumps(info.get('default'))}`"
            bounds = field_bounds(info)
            lines.append(f"| `{field}` | {cell(field_kind(info))} | {cell(default)} | "
                         f"{cell(info.get('description', ''))}{' (' + bounds + ')' if bounds else ''} |")
        lines.append("")
    return "\n".join(lines)
