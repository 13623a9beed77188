"""adcore: anomaly detection for medical image archives.

The library is plain PyTorch and NumPy; everything Ray-shaped lives in ``jobs/``.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import adcore` stays cheap (jobs import it on every Ray worker).
    if name in ("load", "Scorer"):
        from adcore import scorer

        return getattr(scorer, name)
    if name in ("create", "list_models"):
        from adcore import models

        return getattr(models, name)
    raise AttributeError(f"module 'adcore' has no attribute {name!r}")
