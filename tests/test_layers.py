"""Layering of the crypto core: the format and key modules load no I/O framework.

Each check runs in a fresh interpreter so that modules imported by other tests don't hide an
import. (Layers above the crypto core add their own checks here.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest

FRAMEWORKS = "{'trio', 'pyfuse3', 'boto3', 'botocore'}"


def run(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("module", ["cssfs.crypto", "cssfs.keys", "cssfs.envelope"])
def test_crypto_core_imports_no_framework(module: str) -> None:
    run(f"import {module}, sys; bad = {FRAMEWORKS} & set(sys.modules); assert not bad, bad")


@pytest.mark.parametrize("module", ["cssfs.crypto", "cssfs.keys", "cssfs.envelope"])
def test_crypto_core_imports_only_lower_layers(module: str) -> None:
    allowed = "{'cssfs', 'cssfs.errors', 'cssfs.crypto', 'cssfs.keys', 'cssfs.envelope'}"
    run(
        f"import {module}, sys; "
        f"bad = {{m for m in sys.modules if m.startswith('cssfs')}} - {allowed}; "
        "assert not bad, bad"
    )


def test_errors_imports_no_cssfs_module() -> None:
    run(
        "import cssfs.errors, sys; "
        "bad = {m for m in sys.modules if m.startswith('cssfs.')} - {'cssfs.errors'}; "
        "assert not bad, bad"
    )
