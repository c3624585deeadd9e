"""``hiwin bench-vision --forms`` on the tiny configuration: every form runs, and the fast and exported
forms give the released form's visual tokens (the timing columns are measurements, not checked)."""

import torch

from hiwin_model.bench import FORMS, bench_forms
from hiwin_model.tiny import tiny_config


def test_forms_agree_with_the_released_form():
    rep = bench_forms(700, 420, 6, "cpu", torch.float32, repeats=1, config=tiny_config())
    assert [r["form"] for r in rep.rows] == [f[0] for f in FORMS]
    released, *others = rep.rows
    assert released["max_rel"] == 0.0 and released["speedup"] == 1.0
    for r in others:
        assert r["max_rel"] <= 1e-4 and r["cosine"] > 0.99999, r
        assert r["total_s"] > 0
    assert rep.meta["crops"] > 1 and "| form |" in rep.markdown()
