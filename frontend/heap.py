"""glibc heap settings that bound what a flood of gRPC connections leaves the frontend holding.

gRPC's C core allocates from its own threads; glibc gives busy threads arenas of their own (up to 8 per
core) and keeps what they free. Under an endless HTTP/2 header block this grew the frontend by hundreds of
MiB, nearly all of it freed but never returned (docs/reliability.md, "Resource limits").
"""

import ctypes

M_ARENA_MAX = -8
# Two arenas: the event loop's and one shared by gRPC's threads; more buy a KMS plugin nothing.
ARENAS = 2

_libc = ctypes.CDLL(None)  # the interpreter's libc, without find_library's subprocess


def limit_arenas() -> None:
    """Call before any thread starts: threads already running keep the arenas they have."""
    mallopt = getattr(_libc, "mallopt", None)  # glibc only; other libcs size their heaps otherwise
    if mallopt is not None:
        mallopt(M_ARENA_MAX, ARENAS)


def return_free_memory() -> None:
    """Give freed heap pages back to the system (glibc keeps them otherwise, in the middle of an arena)."""
    malloc_trim = getattr(_libc, "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
