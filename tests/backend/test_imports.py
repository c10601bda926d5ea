"""The backend package imports lazily; its pure modules do no I/O imports.

``__all__`` of every module is checked by tests/test_exports.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

__all__: list[str] = []


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
