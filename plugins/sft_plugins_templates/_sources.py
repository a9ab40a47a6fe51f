"""Reading the jinja sources shipped beside the family modules."""

from __future__ import annotations

from importlib.resources import files


def load(filename: str) -> str:
    """The template in ``sources/<filename>``, without the file's final newline.

    Editors add a final newline; after a ``{{ ... }}`` tag it would be rendered, so it is never
    part of a template.
    """
    return (files(__package__) / "sources" / filename).read_text(encoding="utf-8").rstrip("\n")
