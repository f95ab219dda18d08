"""The option table and what is written out beside it cannot drift apart."""

from __future__ import annotations

import dataclasses
from typing import get_type_hints

import pytest

from trio_bg._engine.events import TaskEvent
from trio_bg._running.option_table import NURSERY_OPTIONS, markdown_table
from trio_bg._running.options import NurseryOptions, Settings

NAMESPACE = {"TaskEvent": TaskEvent}


@pytest.mark.parametrize("written", [NurseryOptions, Settings])
def test_the_written_options_are_the_tables(written: type) -> None:
    hints = get_type_hints(written, localns=NAMESPACE)
    assert hints == {option.name: option.type for option in NURSERY_OPTIONS}


def test_settings_take_the_tables_defaults() -> None:
    settings = Settings.from_options({})
    fields = {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)}
    assert fields == {option.name: option.default for option in NURSERY_OPTIONS}


def test_the_docs_table_has_a_row_per_option() -> None:
    rows = markdown_table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows][: len(NURSERY_OPTIONS)] == [
        option.name for option in NURSERY_OPTIONS
    ]
    assert "`--grace-period`" in rows[0]
