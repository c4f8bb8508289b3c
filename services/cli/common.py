"""Arguments and option parsing that several command groups share."""

from __future__ import annotations

import argparse
import json
import logging

from editstream.models import EMBEDDED_LLM

log = logging.getLogger("editstream")


def parse_options(items: list[str]) -> dict:
    """KEY=VALUE method options; VALUE is read as JSON when it parses (numbers, true), else a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option {item!r}: expected KEY=VALUE, e.g. expert=full")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def edit_scope_arg(p: argparse.ArgumentParser) -> None:
    """--edit-scope, for the commands that generate with edits in effect (serve, bench quality)."""
    p.add_argument(
        "--edit-scope",
        choices=("answer", "text"),
        default="answer",
        help="how far a fired edit of RECIPE, text-RAG or SCEN shapes an answer: 'answer' (default, as served) "
        "until the edit's target is said or the first '.'/newline, then the base model goes on; 'text': all of it",
    )


def method_args(p: argparse.ArgumentParser) -> None:
    """--method, --model, --checkpoint: the same three for every command that runs the system."""
    p.add_argument("--method", default="recipe", help="editing method (default recipe)")
    p.add_argument("--model", default=EMBEDDED_LLM, help="causal LM: embedded name, HF id or local path")
    p.add_argument("--checkpoint", default=None, help="RECIPE checkpoint dir (default: the packaged one)")


def option_arg(p: argparse.ArgumentParser) -> None:
    """--option KEY=VALUE, the method options every editor and replica of the run gets."""
    p.add_argument(
        "--option",
        action="append",
        default=[],
        help="KEY=VALUE method option for every editor and replica (e.g. encoder_int8=true), repeatable",
    )
