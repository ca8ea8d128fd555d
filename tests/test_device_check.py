"""The GPU check script runs on CPU with small models of the same architectures, so it cannot rot
before a session with a GPU needs it (benchmarks/device_check.py)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import device_check  # noqa: E402


@pytest.mark.slow
def test_tiny_device_check_times_every_editor_and_trains_under_bf16_mixed(tmp_path, one_thread):
    res = device_check.main(["--tiny", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["models"].keys() == {"gpt2_xl", "llama_7b"} == res["models"].keys()
    for name, r in saved["models"].items():
        assert r["parameters"] > 0
        ratios = r["ratio_to_fwd_bwd"]
        assert set(ratios) == {"mend_edit", "mend_step_bf16", "patcher_edit", "surgery_dynamic_edit"}, name
        assert all(math.isfinite(v) and v > 0 for v in ratios.values()), (name, ratios)
    # the smoke run goes through train.py with --trainer.precision bf16-mixed and gradient clipping
    # (the meta-training configs' setting), which Lightning refuses with a fused optimizer
    assert saved["smoke_train"]["ok"], saved["smoke_train"].get("error")
    assert "gpt2_xl" in (tmp_path / "device_check.md").read_text()


def test_real_sizes_are_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(device_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        device_check.main(["--no_train"])
