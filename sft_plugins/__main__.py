"""``python -m sft_plugins`` runs the ``sft-plugins`` command."""

from sft_plugins.cli import main

if __name__ == "__main__":
    main()
