"""Bad input gets one plain line: config files with repeated keys, messages that look like markup,
and file-system failures (read-only or full output folders) named by path, never a traceback."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import mounted_tmpfs
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.errors import MergetuneError, describe_os_error, read_config_file
from mergetune.recipe import Recipe

runner = CliRunner()


def test_a_repeated_yaml_key_is_an_error_naming_the_key_and_both_lines(tmp_path):
    config = tmp_path / "search.yaml"
    config.write_text("name: a\nseed: 1\nbudget: {candidates: 4}\nseed: 2\n")
    with pytest.raises(MergetuneError) as err:
        read_config_file(config, "search config")
    message = str(err.value)
    assert str(config) in message and "duplicate key 'seed'" in message and "first on line 2" in message
    assert "line 4" in message


def test_a_repeated_key_in_a_nested_yaml_mapping_is_found(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("options:\n  scope: global\n  scope: tensor\n")
    with pytest.raises(MergetuneError, match="duplicate key 'scope'"):
        read_config_file(config, "recipe")


def test_a_repeated_json_key_is_an_error(tmp_path):
    config = tmp_path / "recipe.json"
    config.write_text('{"method": "ties", "seed": 1, "seed": 2}')
    with pytest.raises(MergetuneError, match=r"duplicate key\(s\) \['seed'\]"):
        read_config_file(config, "recipe")


def test_yaml_without_repeats_reads_as_before(tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text("a: 1\nb: {a: 2}\nc: [1, 2]\n")
    assert read_config_file(config, "config") == {"a": 1, "b": {"a": 2}, "c": [1, 2]}


def test_yaml_objects_are_not_constructed(tmp_path):
    config = tmp_path / "evil.yaml"
    config.write_text("a: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(MergetuneError, match="not valid YAML"):
        read_config_file(config, "config")


def test_error_text_is_printed_literally_not_as_markup(tmp_path):
    """'[inf]' used to vanish and '[/x]' crashed the printer: rich read them as markup tags."""
    folder = tmp_path / "run [inf] [/x]"
    result = runner.invoke(app, ["merge", str(folder / "recipe.yaml"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: recipe file not found: {folder / 'recipe.yaml'}"


def test_an_unwritable_output_path_is_one_line_naming_it(tiny_llama_dir, tmp_path):
    """Writing below a path that is a file fails in the OS: one line naming the path, exit code 2."""
    base_dir, experts = tiny_llama_dir
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    recipe = Recipe(base=str(base_dir), experts=[{"name": "math", "model": str(experts["math"])}], method="ties")
    path = recipe.save(tmp_path / "r.yaml")
    result = runner.invoke(app, ["merge", str(path), str(blocker / "out"), "--engine", "eager"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ") and str(blocker) in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_read_only_output_folder_is_one_line_naming_it(tiny_llama_dir, tmp_path):
    """A real read-only file system (a tmpfs mounted ro), not a permission bit that root ignores."""
    base_dir, experts = tiny_llama_dir
    recipe = Recipe(base=str(base_dir), experts=[{"name": "math", "model": str(experts["math"])}], method="ties")
    path = recipe.save(tmp_path / "r.yaml")
    with mounted_tmpfs(tmp_path / "ro", "size=64k,ro") as read_only:
        result = runner.invoke(app, ["merge", str(path), str(read_only / "out"), "--engine", "eager"])
    assert result.exit_code == 2, result.output
    assert (
        result.output.startswith(f"error: cannot write {read_only / 'out'}")
        and "Read-only file system" in result.output
    )
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, "no space left on the device holding /run/x: free some space"),
        (errno.EROFS, "cannot write /run/x: Read-only file system; choose a writable output folder"),
        (errno.EACCES, "cannot write /run/x: Permission denied"),
        (errno.ENOTDIR, "Not a directory: /run/x"),
    ],
)
def test_os_errors_become_one_actionable_line(code, expected):
    message = describe_os_error(OSError(code, os.strerror(code), "/run/x"))
    assert message.startswith(expected)
    assert "\n" not in message
