"""``python -m streamml`` runs the command-line interface."""

from streamml.cli import main

main()
