"""The docs and examples run as written. README, guide and API reference: their Python blocks in
order, one namespace per file, so later blocks use what earlier ones defined; blocks that are
scripts for torchrun (they start with ``# file: ...``) are compiled only (the distributed tests
cover what they do). ``examples/*.py``: each as a script."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks(name: str) -> list[str]:
    return [textwrap.dedent(b) for b in BLOCK.findall((ROOT / name).read_text())]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["README.md", "docs/guide.md", "docs/api.md"])
def test_doc_blocks_run(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(name)
    assert blocks, f"no python blocks found in {name}"
    namespace = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        compiled = compile(code, f"{name}, python block {i}", "exec")
        if not code.lstrip().startswith("# file:"):
            exec(compiled, namespace)  # noqa: S102 - the docs' own examples


# examples with their own test (a --quick run): tests/test_example_hf_vit.py, tests/test_example_hf_gpt2.py
OWN_TEST = {"hf_vit_mnist.py", "hf_gpt2_stdlib.py", "hf_common.py"}  # hf_common: their shared code


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")
                                          if p.name not in OWN_TEST))
def test_examples_run(script, tmp_path):
    pytest.importorskip("sklearn")  # the examples train on scikit-learn's bundled digits
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}  # this checkout's torchmerge
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), "the example printed nothing"
