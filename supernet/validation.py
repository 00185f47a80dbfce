"""How a pydantic ``ValidationError`` reads to a user: one line per problem, the dotted path to the field first.

Shared by every file format with a pydantic schema (``presets.yaml``, the training config), so a typo reads the
same everywhere: ``optim.stpes: Extra inputs are not permitted (valid: steps, batch_size, ...)``,
``run.autocast: Input should be 'none' or 'bf16' (got 'fp16')``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


def describe(err: ValidationError, schema: type[BaseModel] | None = None, whole: str = "file") -> str:
    """``err``'s problems joined by "; ". ``schema`` (the validated model) lets an unknown key list the valid
    ones; ``whole`` names a problem with the document as a whole (no path)."""
    problems = []
    for e in err.errors():
        where = ".".join(map(str, e["loc"])) or whole
        line = f"{where}: {e['msg'].removeprefix('Value error, ')}"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            fields = _fields_at(schema, e["loc"][:-1]) if schema is not None else None
            if fields:
                line += f" (valid: {', '.join(fields)})"
        elif e["type"] != "missing" and isinstance(value, str | int | float | bool):
            line += f" (got {value!r})"  # pydantic names the rule, not the value that broke it
        problems.append(line)
    return "; ".join(problems)


def _fields_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The field names of the model at ``loc`` inside ``schema`` (None past a list, dict or union)."""
    for part in loc:
        field = schema.model_fields.get(part) if isinstance(part, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        schema = annotation
    return list(schema.model_fields)
