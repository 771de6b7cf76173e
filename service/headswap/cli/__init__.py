"""The `headswap` command line: run the server, build models, and talk to a server.

`main` (the console script) is the click group in `headswap.cli.main`; the commands that talk to
a server are built on the Python client (`headswap.client`), so both behave alike.
"""

from headswap.cli.main import main

__all__ = ["main"]
