"""The task configs the README shows are valid task configs (the docs cannot drift from the schema)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mergetune.objectives.tasks import TaskConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_task_entries() -> list[dict[str, Any]]:
    """Every task mapping in the YAML blocks of the README's "Your own tasks" section."""
    text = README.read_text()
    section = text[text.index("## Your own tasks") :]
    section = section[: section.index("\n## ", 1)]
    entries: list[dict[str, Any]] = []
    for block in re.findall(r"```yaml\n(.*?)```", section, flags=re.S):
        data = yaml.safe_load(block)
        entries += data["tasks"] if isinstance(data, dict) else data
    return entries


def test_every_task_the_readme_shows_is_a_valid_task_config() -> None:
    entries = readme_task_entries()
    kinds = {TaskConfig.parse(entry, "README.md").kind for entry in entries}
    assert len(entries) >= 12
    # every kind a user can write is shown at least once
    assert kinds == {"classification", "lm", "multiple_choice", "exact_match", "lm_eval"}
