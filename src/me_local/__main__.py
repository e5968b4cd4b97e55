"""``python -m me_local``: the ``me-local`` command, as ``python -m me_local.cli`` is."""

from .cli.main import main

main()
