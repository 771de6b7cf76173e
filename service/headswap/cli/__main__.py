"""`python -m headswap.cli ...`: how the server starts its own helpers and how tests call the CLI."""

from headswap.cli.main import main

main()
