"""Training and evaluation data in every common SFT format, validated before step 1.

One entry point, :func:`load_sft_dataset`, turns a file, glob, directory, ``Dataset`` or hub name
into canonical rows (see :mod:`sft_plugins.data.schema`) that a chat template and a masking
collator take, having checked every example; :func:`messages_from_row` and
:func:`tools_from_row` read a prepared row back for rendering. See ``docs/data.md``.
"""

from __future__ import annotations

from sft_plugins.bad_examples import location_of
from sft_plugins.data.formats import FORMAT_COLUMNS, KNOWN_ROLES, parse_column_map
from sft_plugins.data.prepare import SFTData, ValidatingTemplate, load_sft_dataset
from sft_plugins.data.schema import (
    CONVERSATION_FEATURES,
    TEXT_FEATURES,
    messages_from_row,
    tools_from_row,
)
from sft_plugins.data.summary import SUMMARY_FILE, DataSummary, SplitSummary

__all__ = [
    "CONVERSATION_FEATURES",
    "FORMAT_COLUMNS",
    "KNOWN_ROLES",
    "SUMMARY_FILE",
    "TEXT_FEATURES",
    "DataSummary",
    "SFTData",
    "SplitSummary",
    "ValidatingTemplate",
    "load_sft_dataset",
    "location_of",
    "messages_from_row",
    "parse_column_map",
    "tools_from_row",
]
