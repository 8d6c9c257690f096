"""The exit-code contract shared by every command.

0: success. 1: a quality gate failed (the job ran, the result is not good enough).
2: bad usage or bad input (a user mistake, reported in one sentence, never a traceback).
3: an internal error (a bug in dfbf: the traceback is shown). 130: interrupted.
"""

EXIT_OK = 0
EXIT_QUALITY_GATE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class DfbfError(Exception):
    """A problem with what the user asked for or gave us: reported as one sentence, exit 2."""

    exit_code = EXIT_USAGE


class QualityGateFailed(DfbfError):
    """The job finished but missed a threshold the user set (for CI scripts): exit 1."""

    exit_code = EXIT_QUALITY_GATE
