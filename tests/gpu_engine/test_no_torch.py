"""config, sequence, outputs, block_manager and scheduler must import without torch: the
worker's host process uses them (and they stay plain Python by design)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import gpu_engine

TORCH_FREE = ["config", "sequence", "outputs", "block_manager", "scheduler", "errors"]
PKG = Path(gpu_engine.__file__).parent


def test_modules_have_no_torch_imports() -> None:
    for name in TORCH_FREE:
        tree = ast.parse((PKG / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            assert not any(m.split(".")[0] in ("torch", "transformers") for m in mods), name


def test_importing_them_does_not_load_torch() -> None:
    imports = "; ".join(f"import gpu_engine.{n}" for n in TORCH_FREE)
    code = (
        f"import sys; {imports}; "
        "from gpu_engine import SamplingParams, EngineConfig, StepOutput, EngineCapacity, "
        "RequestOutput; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    root = PKG.parent
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
