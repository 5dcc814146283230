"""The package version, in the core layer (``mae_bench/__init__.py`` is the application layer's
public facade, which core modules must not import)."""

__version__ = "0.1.0"
