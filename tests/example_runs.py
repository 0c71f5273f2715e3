"""Running an example script of this checkout with ``--quick`` and reading the JSON it writes
(the tests of examples/hf_vit_mnist.py and examples/hf_gpt2_stdlib.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_quick(script: str, out_dir: Path, timeout: int) -> dict:
    """``python examples/<script> --quick --out <out_dir>/results.json``; its results."""
    out = out_dir / "results.json"
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's torchmerge
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out)],
                          cwd=out_dir, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.exists(), f"no JSON at {out}; stdout: {done.stdout[-2000:]}"
    return json.loads(out.read_text())
