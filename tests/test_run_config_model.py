"""One spelling of model settings in run configs: `model.<field>` next to the preset (what
docs/training.md documents and every configs/*.yaml uses); `model.overrides` is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from train.run_config import ConfigError, dump_yaml, load_run_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
DATA = "data.manifests=[m.json]"


def test_model_fields_next_to_the_preset(tmp_path: Path) -> None:
    cfg = load_run_config(TINY, [DATA, "model.n_layer=3", "model.preset=169m"])
    assert cfg.model.preset == "169m"
    assert cfg.model.overrides == {"vocab_size": "auto", "ctx_len": "auto", "n_layer": 3}
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_embd: 96\ndata:\n  manifests: [m.json]\n")
    cfg = load_run_config(f)
    assert cfg.model.preset == "tiny" and cfg.model.overrides == {"n_embd": 96}


@pytest.mark.parametrize("key", ["model.overrides.n_layer=3", "model.overrides={n_layer: 3}"])
def test_overrides_spelling_refused_on_the_command_line(key: str) -> None:
    with pytest.raises(ConfigError, match=r"model\.overrides is not a key.*--set model\.n_layer=12"):
        load_run_config(TINY, [DATA, key])


def test_overrides_spelling_refused_in_yaml(tmp_path: Path) -> None:
    f = tmp_path / "old.yaml"
    f.write_text("model:\n  preset: tiny\n  overrides:\n    n_layer: 3\ndata:\n  manifests: [m.json]\n")
    with pytest.raises(ConfigError, match=rf"{f}: model\.overrides is not a key.*preset: 1b5, n_layer: 12"):
        load_run_config(f)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_resolved_config_loads_back(tmp_path: Path, name: str) -> None:
    """config.resolved.yaml (dump_yaml) is written in the accepted spelling: a run can restart from it."""
    cfg = load_run_config(REPO / "configs" / name, [DATA, "model.n_layer=2"])
    saved = tmp_path / "config.resolved.yaml"
    saved.write_text(dump_yaml(cfg))
    assert "overrides" not in yaml.safe_load(saved.read_text())["model"]
    again = load_run_config(saved)
    assert again.to_dict() == cfg.to_dict() and again.model == cfg.model
