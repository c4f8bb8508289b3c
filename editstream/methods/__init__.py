"""The method registry: one line per method, imported on first use. No method branches elsewhere."""

from __future__ import annotations

import importlib
from typing import Any

from editstream.errors import UnknownMethodError
from editstream.methods.base import EditMethod, QueryPlan
from editstream.models import LoadedLM

METHODS: dict[str, str] = {
    "none": "editstream.methods.none:NoEdit",
    "text-rag": "editstream.methods.textrag:TextRAG",
    "recipe": "editstream.methods.recipe.method:Recipe",
    "ft": "editstream.methods.ft:FineTune",
    "scen": "editstream.methods.scen.method:Scen",
    "rome": "editstream.methods.rome.method:Rome",
    "memit": "editstream.methods.rome.method:Memit",
    "rledit": "editstream.methods.rledit.method:RLEdit",
}


def method_class(name: str) -> type[EditMethod]:
    try:
        module, cls = METHODS[name].split(":")
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; registered: {sorted(METHODS)}") from None
    return getattr(importlib.import_module(module), cls)


def create_method(name: str, lm: LoadedLM, **options: Any) -> EditMethod:
    """An instance of the method registered as `name`, on `lm`."""
    return method_class(name).build(lm, **options)


__all__ = ["METHODS", "EditMethod", "QueryPlan", "create_method", "method_class"]
