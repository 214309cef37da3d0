"""bench/long_range.py: the recall task's sequences, equal parameter counts, and a few-step run end to end."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from train.models import ARCH_MODULES

# bench/ is not a package, and putting it on sys.path would let bench/train.py shadow the train package
BENCH = Path(__file__).resolve().parents[1] / "bench" / "long_range.py"
_SPEC = importlib.util.spec_from_file_location("long_range", BENCH)
long_range = importlib.util.module_from_spec(_SPEC)
sys.modules["long_range"] = long_range  # dataclasses look the module up by name
_SPEC.loader.exec_module(long_range)


def test_each_query_asks_a_key_of_its_sequence_and_the_target_is_that_keys_value():
    task = long_range.Task(pairs=3)
    idx, target = task.batch(64, 10, torch.Generator().manual_seed(0))
    assert idx.shape == (64, 1 + 6 + 10 + 2)
    for row, want in zip(idx.tolist(), target.tolist(), strict=True):
        pairs = dict(zip(row[1:7:2], row[2:7:2], strict=True))
        assert len(pairs) == 3  # distinct keys
        assert row[-2] == long_range.QUERY and pairs[row[-1]] == want
        assert all(t >= 2 + task.n_keys + task.n_values for t in row[7:-2])  # distractors only


def test_a_few_steps_of_every_architecture_give_a_table_and_a_plot(tmp_path, capsys):
    png = tmp_path / "lr.png"
    rows = long_range.main(["--steps", "2", "--batch", "4", "--train-max-distance", "4",
                            "--distances", "8,16", "--eval-samples", "4", "--eval-batch", "4",
                            "--threads", "1", "--out", str(png)])
    assert len(rows) == len(ARCH_MODULES)  # every registered architecture by default
    target = rows[0][1]
    for _, n_params, accs in rows:
        assert abs(n_params - target) <= 0.03 * target
        assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)
    out = capsys.readouterr().out
    assert "| model | params | D=8 | D=16 |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
