"""``python -m adcore``: the ``adcore`` command (:mod:`adcore.commands`)."""

from adcore.commands import main

main()
