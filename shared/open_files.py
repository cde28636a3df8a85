"""The open-file limit of a long-running process: raised to its hard limit at start.

systemd's default soft limit is 1,024. Every connection to a listener costs a descriptor, so 1,024 idle
connections would starve the process (libzmq even aborts when its ipc listener meets EMFILE). The hard
limit is what the operator allows (LimitNOFILE= in the units); the soft limit is only a default for
programs that use select(), which ours never do.
"""

import resource

from keysealer.shared.errors import UsageError

# Below this a few hundred idle connections would exhaust the process; refuse rather than fall over later.
MIN_OPEN_FILES = 4096
# What the soft limit becomes when the hard limit is unlimited (the kernel's default fs.nr_open).
UNLIMITED_TARGET = 1 << 20


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if target < MIN_OPEN_FILES:
        raise UsageError(f"the open file limit (hard RLIMIT_NOFILE) is {hard}, below the {MIN_OPEN_FILES} this "
                         "program needs: raise it (LimitNOFILE= in the unit, ulimit -Hn)")
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            raise UsageError(f"cannot raise the open file limit from {soft} to {target}: {exc}") from None
        soft = target
    return soft
