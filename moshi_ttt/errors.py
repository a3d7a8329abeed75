"""The project's error types and the exit codes the command line gives them.

This module imports nothing from the package, so every layer (ttt, model, data, train, eval) can
raise these. Each command prints one line ``error: <message>`` and exits with the code of the
error's kind; ``--debug`` shows the traceback instead.

Exit codes (distinct per kind, so that scripts and schedulers can tell them apart):

====  ==========================================================================
0     success (also: ``--resume`` of a run that had already finished)
1     bad input data (a manifest entry, an audio or codes file, ``prepare`` with nothing written)
2     bad configuration or command-line value (argparse also uses 2)
3     training stopped on purpose (too many non-finite steps)
4     checkpoint missing, corrupt or not resumable
5     weights, adapter or memory file missing, corrupt or not fitting the model
6     the file system refused a write or a read (disk full, read-only, permission)
7     device problem (unknown device string, CUDA asked for but absent, out of device memory)
70    an unexpected internal error (a bug: please report it with the ``--debug`` traceback)
130   interrupted by SIGINT (Ctrl-C) after writing a checkpoint
143   interrupted by SIGTERM (scheduler pre-emption) after writing a checkpoint
====  ==========================================================================
"""

from __future__ import annotations

import errno

EXIT_DATA = 1
EXIT_CONFIG = 2
EXIT_STOPPED = 3
EXIT_CHECKPOINT = 4
EXIT_WEIGHTS = 5
EXIT_IO = 6
EXIT_DEVICE = 7
EXIT_INTERNAL = 70
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class MoshiTTTError(Exception):
    """Base of the errors a user can cause; ``exit_code`` is what the command line returns."""

    exit_code: int = EXIT_INTERNAL


class InputDataError(MoshiTTTError):
    """Input data cannot be used (exit code 1)."""

    exit_code = EXIT_DATA


class ConfigValueError(MoshiTTTError, ValueError):
    """A configuration or argument value is out of range or of the wrong type (exit code 2)."""

    exit_code = EXIT_CONFIG


class IntegrityError(MoshiTTTError, ValueError):
    """A file we wrote and read back fails its checksum or holds non-finite or out-of-range values
    (exit code 5); the message names the file and the tensor."""

    exit_code = EXIT_WEIGHTS


class DiskError(MoshiTTTError, OSError):
    """Not enough free space, or a path that cannot be written (exit code 6)."""

    exit_code = EXIT_IO


class DeviceError(MoshiTTTError, ValueError):
    """The device string is unknown or the device is unavailable (exit code 7)."""

    exit_code = EXIT_DEVICE


# OS errors a user causes with a path or a full disk: one line, exit code 6.
USER_OS_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.EISDIR,
                  errno.ENOTDIR, errno.EDQUOT, errno.EEXIST, errno.ENOTEMPTY, errno.EIO, errno.EFBIG,
                  errno.ENAMETOOLONG}


def describe_os_error(e: OSError) -> str:
    """``OSError`` -> one line naming the file and what to do."""
    where = e.filename if e.filename is not None else "a file"
    what = e.strerror or str(e)
    hint = {errno.ENOSPC: " (the disk is full: free space or point the output elsewhere)",
            errno.EDQUOT: " (disk quota exceeded)",
            errno.EROFS: " (read-only file system: choose a writable folder)",
            errno.EACCES: " (permission denied: choose a folder you can write)"}.get(e.errno or -1, "")
    return f"{where}: {what}{hint}"
