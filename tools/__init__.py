"""Command-line tools (run as scripts); a package so that they share ``tools/_cli.py``."""
