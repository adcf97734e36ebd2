"""What the `splitserve` commands share: the error console, common options, model lookup."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)

DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU)")
]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", help="A Hugging Face model directory, or a known name: smollm2-135m-instruct"
    ),
]


def fail(msg: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False)
    raise typer.Exit(code)


def resolve_model(model: str) -> Path:
    """A directory as given, or a known model name pulled into the cache on first use."""
    from splitserve.models_pull import KNOWN_MODELS, pull_model

    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if model in KNOWN_MODELS:
        return pull_model(model)
    fail(f"model directory not found: {model} (known names: {', '.join(KNOWN_MODELS)})")
    raise AssertionError
