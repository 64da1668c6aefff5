"""The JSON Schema of recipes, with each registered step's Config under its `uses:` name."""

from __future__ import annotations

from typing import Any

from compressor.recipe.schema import Recipe


def recipe_schema(host: Any) -> dict[str, Any]:
    """Recipe schema where `steps` items are one of the registered steps (if/then on `uses`)."""
    schema = Recipe.model_json_schema(by_alias=True)
    defs = schema.setdefault("$defs", {})
    variants = []
    for name, cls in sorted(host.steps.items()):
        config = cls.Config.model_json_schema()
        for key, value in config.pop("$defs", {}).items():
            defs.setdefault(key, value)
        variants.append({"if": {"properties": {"uses": {"const": name}}},
                         "then": {"properties": {"with": config}}})
    step = defs["StepSpec"]
    step["properties"]["uses"]["enum"] = sorted(host.steps)
    step["allOf"] = variants
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
