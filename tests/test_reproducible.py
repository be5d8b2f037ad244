"""llmq pins MKL's numerical reproducibility before any matrix product, unless the user chose a mode."""

from __future__ import annotations

import os
import subprocess
import sys


def _mkl_cbwr_after_import(env: dict[str, str]) -> str:
    code = "import llmq, os; print(os.environ.get('MKL_CBWR'))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return p.stdout.strip()


def test_importing_llmq_pins_mkl_reproducibility():
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    assert _mkl_cbwr_after_import(env) == "AUTO,STRICT"


def test_a_mode_the_user_set_is_kept():
    assert _mkl_cbwr_after_import({**os.environ, "MKL_CBWR": "COMPATIBLE"}) == "COMPATIBLE"
