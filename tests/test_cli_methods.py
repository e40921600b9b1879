"""``mergetune methods``: every registered method, with its paper, parameters, mergekit status and data needs.

Parametrised over the registry, so methods other modules register are covered without editing this
file; a toy method registered for one test shows it. The mergekit column is compared with each
class's own ``mergekit`` declaration, and the parameters with its ``Options`` model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.merging.mergekit_spec import MergekitRefusal
from mergetune.merging.methods import METHODS, MethodOptions, TensorMethod, get_method, register, unregister

runner = CliRunner()


def listed(*extra: str) -> Any:
    result = runner.invoke(app, ["methods", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def rows() -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in json.loads(listed("--json"))}


def test_every_registered_method_is_listed_once() -> None:
    names = [row["name"] for row in json.loads(listed("--json"))]
    assert sorted(names) == sorted(METHODS) and len(names) == len(set(names))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_row_says_paper_parameters_mergekit_and_data(name: str) -> None:
    row, method = rows()[name], get_method(name)
    assert row["paper"] == method.citation and row["paper"].strip(), f"{name} names no paper"
    assert set(row["parameters"]["options"]) == set(method.Options.model_fields)
    assert row["parameters"]["weight"]["warm_start"] == method.warm_start.weight
    assert (row["parameters"]["density"] is not None) == method.uses_density
    assert row["needs_data"] is method.needs_data
    spec = method.mergekit
    if isinstance(spec, MergekitRefusal):
        assert row["mergekit"] == {"exactness": "refused", "method": None, "reason": spec.reason}
    else:
        assert (row["mergekit"]["exactness"], row["mergekit"]["method"]) == (spec.faithful, spec.method)
        assert spec.faithful in {"exact", "in distribution", "approximate"}


def test_known_entries() -> None:
    """Independent expectations on a few methods: what the papers and mergekit 0.1.5 say."""
    table = rows()
    assert table["task_arithmetic"]["mergekit"]["exactness"] == "exact"
    assert table["dare_ties"]["mergekit"]["exactness"] == "in distribution"
    assert table["tsv"]["mergekit"]["exactness"] == "approximate"
    assert table["iso_cts"]["mergekit"]["exactness"] == "refused"
    assert table["twin"]["needs_data"] is True  # its router is trained on task data
    assert table["ties"]["needs_data"] is False
    assert table["iso_cts"]["parameters"]["options"]["common_space_fraction"]["default"] == 0.8


def test_the_table_names_every_method_and_how_mergekit_takes_it() -> None:
    text = listed()
    for name in METHODS:
        assert name in text
    for word in ("refused", "exact", "approximate", "in", "distribution"):
        assert word in text


class ToyOptions(MethodOptions):
    strength: float = 2.0


class ToyDataMethod(TensorMethod):
    name = "toy_data_method"
    Options = ToyOptions
    needs_data = True
    citation = "Nobody 2026, A toy"

    def merge_tensor(self, ctx: Any, segment_index: int) -> Any:
        raise NotImplementedError


@pytest.fixture
def toy() -> Iterator[str]:
    register(ToyDataMethod())
    try:
        yield ToyDataMethod.name
    finally:
        unregister(ToyDataMethod.name)


def test_a_newly_registered_method_is_listed_without_editing_the_command(toy: str) -> None:
    row = rows()[toy]
    assert row["paper"] == "Nobody 2026, A toy"
    assert row["needs_data"] is True
    assert row["parameters"]["options"] == {"strength": {"default": 2.0, "description": ""}}
    assert row["mergekit"] == {"exactness": "refused", "method": None, "reason": "no mergekit translation declared"}
    assert toy in listed()
