"""me-local: serve an ensemble of quantized GGUF models as one model.

The public surface is small: load a config, build an :class:`~me_local.engine.Engine`,
generate. Everything else is private modules behind it.
"""

__version__ = "0.1.0"
