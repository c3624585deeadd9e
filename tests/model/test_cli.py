import os
import shutil
import subprocess

import pytest
from safetensors.torch import load_file

from hiwin_model.cli import main


def test_main_job_on_the_embedded_default(capsys, caplog):
    """The README's main job on PyTorch: the embedded demo model answers a held-out demo question
    (a 1x2-sliced page: 2 slices + overview) and prints question, answer and expected answer. The
    shipped model's held-out accuracy is 28.5 % (hiwin_model/demo/CARD.md), so only the form of the
    answer is asserted: one of the task's answers, and the verdict matches it."""
    from hiwin_model.demo_task import ANSWERS, demo_question

    _, question, expected = demo_question()
    caplog.set_level("INFO", logger="hiwin")
    assert main(["generate", "--max-new-tokens", "8"]) == 0
    q, a, e = capsys.readouterr().out.splitlines()
    answer = a.removeprefix("answer: ")
    assert q == f"question: {question}" and answer in ANSWERS
    assert e == f"expected: {expected} ({'correct' if answer == expected else 'WRONG'})"
    assert "grid (1, 2), 3 crops" in caplog.text and "embedded demo model" in caplog.text


def test_generate_and_encode_with_a_model_dir(tiny_dir, tmp_path, capsys):
    from conftest import random_image

    img = tmp_path / "img.png"
    random_image(500, 300).save(img)
    assert main(["generate", "--model", str(tiny_dir), "--image", str(img), "--prompt", "Hi?",
                 "--max-new-tokens", "3", "--sample", "--seed", "1"]) == 0
    out = tmp_path / "tok.safetensors"
    assert main(["encode", "--model", str(tiny_dir), "--image", str(img), "--out", str(out)]) == 0
    assert load_file(str(out))["visual_tokens"].shape == (445, 128)


def test_bad_inputs_exit_2_with_a_message(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    assert main(["generate", "--model", str(tiny_dir), "--image", str(bad)]) == 2
    assert "hiwin: error:" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing")]) == 2
    assert "model directory not found" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_dir), "--max-new-tokens", "0"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun (ships with torch)")
def test_stage1_under_torchrun_ddp(tiny_dir, tmp_path):
    from hiwin_model.synthetic import write_training_data

    data = write_training_data(tmp_path / "data", n=4)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "hiwin_model.cli", "train", "stage1",
           "--model", str(tiny_dir), "--data", str(data / "pretrain.json"), "--image-folder", str(data / "images"),
           "--output", str(tmp_path / "out"), "--steps", "2", "--log-every", "1", "--device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2/2" in r.stderr
    assert (tmp_path / "out" / "mm_projector.bin").is_file()
