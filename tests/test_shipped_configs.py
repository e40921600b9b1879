"""Every search config shipped in configs/ validates under the strict schema (unknown keys are errors).

A config a user copies must not fail on its first line; before this test, configs/llm4.yaml was parsed by no test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergetune.search.config import SearchConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_configs_folder_holds_the_documented_configs() -> None:
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "text4", "text8", "text8-twin", "llm-tiny", "llm4", "custom-tasks"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_a_shipped_config_validates(path: Path) -> None:
    config = SearchConfig.model_validate(yaml.safe_load(path.read_text()))
    assert config.name and config.budget.candidates >= 1
