"""Every backend module declares ``__all__``; the package imports lazily."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

import backend

__all__: list[str] = []

MODULES = sorted(
    f"backend.{info.name}"
    for info in pkgutil.iter_modules(backend.__path__)
    if info.name != "__main__"
)


@pytest.mark.parametrize("name", ["backend", *MODULES])
def test_all_names_exist(name: str) -> None:
    module = importlib.import_module(name)
    assert isinstance(module.__all__, list)
    for public in module.__all__:
        assert getattr(module, public) is not None, f"{name}.{public}"


def test_package_import_pulls_in_neither_aiohttp_nor_langchain() -> None:
    probe = (
        "import sys, backend; "
        "assert not {'aiohttp', 'langchain_core'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


@pytest.mark.parametrize("module", ["backend.text", "backend.sse", "backend.settings"])
def test_pure_modules_do_no_io_imports(module: str) -> None:
    probe = f"import sys, {module}; assert not {{'aiohttp', 'asyncio'}} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", probe], check=True)
