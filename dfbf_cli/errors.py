"""The exit-code contract shared by every command.

0: success. 1: a quality gate failed (the job ran, the result is not good enough).
2: bad usage or bad input (a user mistake, reported in one sentence, never a traceback).
3: an internal error (a bug in dfbf: the traceback is shown). 4: a resource ran out (disk space, a quota,
memory): one sentence; free it and run the same command again, finished work is kept. 130: interrupted.
"""

import errno

EXIT_OK = 0
EXIT_QUALITY_GATE = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_RESOURCE = 4
EXIT_INTERRUPTED = 130


class DfbfError(Exception):
    """A problem with what the user asked for or gave us: reported as one sentence, exit 2."""

    exit_code = EXIT_USAGE


class QualityGateFailed(DfbfError):
    """The job finished but missed a threshold the user set (for CI scripts): exit 1."""

    exit_code = EXIT_QUALITY_GATE


class ResourceExhausted(DfbfError):
    """The machine ran out of something the job needs (disk space, memory): not a bug, not a usage mistake: exit 4."""

    exit_code = EXIT_RESOURCE


_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_DISK_WORDS = ("No space left on device", "Disk quota exceeded", "File too large")
_MEMORY_WORDS = ("out of memory", "can't allocate memory", "Cannot allocate memory")


def exhausted(error: BaseException) -> ResourceExhausted | None:
    """The sentence for an exception that means a resource ran out (libraries wrap the OS error in their own
    types, so the cause chain and the message are read too); None for anything else."""
    seen: BaseException | None = error
    while seen is not None:
        text = str(seen)
        if isinstance(seen, OSError) and seen.errno in _DISK or any(w in text for w in _DISK_WORDS):
            where = f" (writing {seen.filename})" if isinstance(seen, OSError) and seen.filename else ""
            return ResourceExhausted(f"The disk is full or the file too large for it{where}: free some space (or choose another place) and run "
                                     "the same command again; finished work is kept.")
        if isinstance(seen, MemoryError) or isinstance(seen, OSError) and seen.errno == errno.ENOMEM or any(w in text for w in _MEMORY_WORDS):
            return ResourceExhausted("Out of memory: use a smaller --batch or --imgsz (or another --device), then run the same command again.")
        seen = seen.__cause__ or seen.__context__
    return None


def refuse_unused(**given: tuple[bool, str]) -> None:
    """One sentence for an option that the chosen mode would silently ignore: ``name=(given, why)``."""
    for name, (was_given, why) in given.items():
        if was_given:
            raise DfbfError(f"--{name.replace('_', '-')} {why}")
