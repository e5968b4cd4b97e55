"""``python -m me_local.cli``: what service units run when ``me-local`` is not on PATH."""

from .main import main

main()
