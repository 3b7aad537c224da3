"""The one exception type for mistakes a user can fix (bad paths, bad files, bad flags).

The CLI prints these as a single line and exits non-zero, and OSErrors from the file system (a full disk, a
read-only destination) too, through `os_error_message`; anything else is a bug and keeps its traceback.
"""
import errno


class UserError(Exception):
    """A problem with the user's input. The message names the problem and, where possible, the fix."""


# What each OSError a user can fix means, and the fix; {path} is the file or directory it names.
_OS_ERRORS = {
    errno.ENOSPC: "no space left on device while writing {path}; free space there or write somewhere else",
    errno.EDQUOT: "disk quota exceeded while writing {path}; free space there or write somewhere else",
    errno.EROFS: "cannot write {path}: the file system is read-only; write somewhere else",
    errno.EACCES: "permission denied: {path}; fix its permissions or use another path",
    errno.EPERM: "operation not permitted: {path}; fix its permissions or use another path",
    errno.ENOTDIR: "{path}: a part of this path is a file, not a directory; use another path",
    errno.EEXIST: "{path} already exists as a file; move it away or use another path",
    errno.EISDIR: "{path} is a directory, not a file; use another path",
    errno.EBUSY: "{path} is busy (a mount point, or in use); use another path",
    errno.ENOENT: "{path} does not exist; check the path",
    errno.ENAMETOOLONG: "{path}: file name too long; use a shorter path",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError from the file system: what happened, to which path, and the fix."""
    path = e.filename if e.filename is not None else "a file"
    template = _OS_ERRORS.get(e.errno)
    return template.format(path=path) if template else f"{path}: {e.strerror or e}"
