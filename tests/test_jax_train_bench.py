"""bench/train_throughput.py --smoke keeps working: both contenders run and the JSON is written."""
import json
import subprocess
import sys

import pytest

from tests.train_fixtures import REPO, train_env


@pytest.mark.slow
def test_train_throughput_smoke_writes_json_and_a_table(tmp_path):
    result = subprocess.run([sys.executable, "bench/train_throughput.py", "--smoke", "--out", str(tmp_path)],
                            cwd=REPO, env=train_env(1), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "train_throughput_smoke.json").read_text())
    assert [r["contender"].split()[0] for r in data["rows"]][:2] == ["jax", "transformers"]
    assert all(r["tokens_per_s"] > 0 for r in data["rows"])
    assert "tokens/s" in result.stdout
