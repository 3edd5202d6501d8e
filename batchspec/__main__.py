"""``python -m batchspec`` runs the CLI."""

from batchspec.cli.main import main

if __name__ == "__main__":
    main()
