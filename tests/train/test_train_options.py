"""`loraplex --help` (serve's and train's) builds its parser without importing torch: it answers at once."""

from __future__ import annotations

import subprocess
import sys


def test_the_parser_imports_no_torch():
    code = ("import sys; from server.cli import build_parser; build_parser().parse_args(['train', 'x', '-o', 'y']); "
            "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
