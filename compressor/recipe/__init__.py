"""The recipe: its schema (YAML → pydantic), the plan checked before any work, sweeps, the step reference."""
