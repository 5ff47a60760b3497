"""``python -m streamml`` runs the command-line interface."""

from streamml.cli import main

if __name__ == "__main__":  # not when a spawned process (the trainer's fitter) imports it
    main()
