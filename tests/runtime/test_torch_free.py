"""The deployable runtime needs no torch: the whole `hiwin-run` path on an export directory in a
subprocess where importing torch, onnx, transformers (and the reference / exporter packages) fails.

This import-blocking subprocess stands in for a fresh virtual environment with only
``pip install hiwin[runtime]``: every module the run imports is one such an environment has.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

BLOCKED = ("torch", "onnx", "onnxscript", "transformers", "safetensors", "polygraphy", "hiwin_model", "hiwin_export")

BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    BLOCKED = {BLOCKED!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: the runtime must not need it")
            return None

    sys.meta_path.insert(0, Block())
""")


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    script = tmp_path / "run.py"
    script.write_text(BLOCKER + textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)


def test_the_blocker_blocks(tmp_path):
    r = _run("import torch\n", tmp_path)
    assert r.returncode != 0 and "torch is blocked" in r.stderr


def test_runtime_answers_without_torch(exported, tmp_path):
    from hiwin_model.synthetic import demo_image
    from hiwin_runtime.pipeline import Pipeline

    image = tmp_path / "page.png"
    demo_image().save(image)
    want = Pipeline.from_export(exported).generate(str(image), "What is in the image?", max_new_tokens=12)
    r = _run(f"""
        import json, sys
        from hiwin_runtime.pipeline import Pipeline
        from hiwin_runtime.cli import main

        pipe = Pipeline.from_export({str(exported)!r})
        ans = pipe.generate({str(image)!r}, "What is in the image?", max_new_tokens=12)
        rc = main(["--model", {str(exported)!r}, "--image", {str(image)!r}, "--max-new-tokens", "12"])
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"ids": ans.token_ids, "text": ans.text, "rc": rc, "leaked": leaked}}))
    """, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0 and out["leaked"] == []
    assert out["ids"] == want.token_ids and len(want.token_ids) > 0
    assert out["text"] == want.text
    assert "1033 visual + " in r.stderr and "[onnxruntime]" in r.stderr


@pytest.mark.parametrize("module", ["hiwin_runtime.slicing", "hiwin_runtime.image", "hiwin_runtime.layout",
                                    "hiwin_runtime.conversation", "hiwin_runtime.buckets",
                                    "hiwin_runtime.crop_chain", "hiwin_runtime.processor", "hiwin_runtime.bench"])
def test_shared_modules_import_without_torch(module, tmp_path):
    r = _run(f"import {module}\n", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
