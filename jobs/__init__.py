"""Ray jobs around the ``adcore`` library: each runs as ``python jobs/<name>.py`` or ``ray job submit``."""
