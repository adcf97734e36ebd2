"""The layout is the architecture: which packages a part may load, checked in fresh
interpreters (an import anywhere in the process would hide a violation here)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after(code: str) -> set[str]:
    """Top-level packages (and kvstore/services modules) in sys.modules after running code."""
    probe = code + (
        "\nimport sys, json\n"
        "print(json.dumps(sorted(m for m in sys.modules if '.' not in m "
        "or m.startswith(('kvstore.', 'services.')))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def modules_of(package: str) -> list[str]:
    return sorted(f"{package}.{m.name}" for m in pkgutil.iter_modules([str(ROOT / package)]))


def test_every_router_module_loads_neither_torch_nor_the_kv_store_server():
    """An ingress starts in a fraction of a second: it tokenizes and routes, it never computes."""
    mods = modules_of("router")
    assert "router.backend" in mods and "router.pd_client" in mods  # its path to the pools
    loaded = loaded_after("".join(f"import {m}\n" for m in mods))
    assert "torch" not in loaded
    assert not loaded & {"kvstore.server", "kvstore.servicer", "kvstore.block_store"}
    assert not {m for m in loaded if m.startswith("services.") and "engine" not in m}
    # Of the engine, only its request-facing, torch-free types: sampling parameters, the
    # tokenizer and chat template, block identity, errors.
    assert {m for m in loaded if m.startswith("services.engine.")} <= {
        "services.engine.sampling_params",
        "services.engine.tokenizer",
        "services.engine.block_hash",
        "services.engine.errors",
    }


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "qwen2_model_dir"])
def test_the_router_at_work_loads_no_torch(fixture, request):
    """Loading a model's tokenizer by the class its route names, rendering its chat template
    and encoding (what the router does per model and per request) leaves torch out too."""
    from services.engine.tokenizer import load_tokenizer

    model_dir = str(request.getfixturevalue(fixture))
    name = load_tokenizer(model_dir).class_name
    loaded = loaded_after(
        "from services.engine.tokenizer import load_tokenizer\n"
        f"tok = load_tokenizer({model_dir!r}, tokenizer_class={name!r})\n"
        "tok.encode('hello there')\n"
        "tok.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
    )
    assert "torch" not in loaded


@pytest.mark.parametrize("package", ["rpc"])
def test_rpc_stands_on_protos_and_grpc_only(package):
    loaded = loaded_after("".join(f"import {m}\n" for m in modules_of(package)))
    assert not loaded & {"torch", "kvstore", "services", "router", "splitserve", "redis"}
