"""bench/gpu_check.py's CPU mode: the GPU check's code paths on tiny shapes, its correctness rows asserted."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(r["check"], r["shape"]): r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert float(rows["04 step 1: loss - ln 2 (bfloat16 autocast)", "tiny"]["value"]) == pytest.approx(0, abs=1e-6)
    assert rows["04 step 1: reward accuracy", "tiny"]["value"] == 0
    assert float(rows["03 implicit reward, model vs its copy", "tiny"]["value"]) < 1e-6
    assert float(rows["greedy tokens equal at batch 1 and 32 (bfloat16)", "tiny"]["value"]) >= 0.9
    assert float(rows["greedy tokens equal at batch 1 and 32 (float32)", "tiny"]["value"]) >= 0.9
    assert float(rows["04 train step 1: loss - NLL - ln 2", "tiny"]["value"]) == pytest.approx(0, abs=1e-6)
    # 04 --lora-rank's step as on a GPU: the model frozen in bf16, fp32 adapters
    assert float(rows["04 LoRA r16 step 1: loss - NLL - ln 2", "tiny"]["value"]) == pytest.approx(0, abs=1e-6)
    assert float(rows["04 LoRA r16 step: tokens/s", "tiny"]["value"]) > 0
    for check in ("generation, ours", "generation, generate()", "generation, the engine before",
                  "scorer (score_sequences), bf16 weights",
                  "04 train step: seconds"):
        assert float(rows[check, "tiny"]["value"]) > 0
    assert (tmp_path / "results.md").read_text().count("\n| ") == len(rows) + 1  # + the header
