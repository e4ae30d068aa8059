"""`python -m kbstream.cli` (what the end-to-end tests run)."""

from kbstream.cli import main

main()
