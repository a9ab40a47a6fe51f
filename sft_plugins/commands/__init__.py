"""Subcommands of ``sft-plugins`` that are large enough to live in their own module."""
