"""dfbf: compress trained vision models without their training data."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dfbf")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
