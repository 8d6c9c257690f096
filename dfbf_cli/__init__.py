"""dfbf: compress trained vision models without their training data.

The Python API (``dfbf_cli.api``) is reachable from here, imported on first use so that ``dfbf --help``
stays light: ``import dfbf_cli as dfbf; run = dfbf.compress("yolo11n-pose.pt", flops=0.7)``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dfbf")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

API = ("compress", "synthesize", "prune", "finetune", "evaluate", "export", "DfbfError")


def __getattr__(name: str):
    if name in API:
        from dfbf_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'dfbf_cli' has no attribute {name!r}")
