"""Root conftest: doctests run over the package, except the module that runs the CLI."""

collect_ignore = ["streamml/__main__.py"]
