"""One lock per run folder while it trains, so two processes never train the same run; the
kernel releases it when the holder dies, even by SIGKILL."""
from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path
from typing import Iterator

from ..errors import ReproError


@contextlib.contextmanager
def run_lock(directory: Path) -> Iterator[bool]:
    """Hold an exclusive lock on a run folder while training it; a second process training
    the same run is refused. The kernel releases it when the holder dies, even by SIGKILL.

    Yields whether the folder is locked: on a file system that cannot take a lock (some NFS
    mounts, where SLURM jobs share a store) the run trains unguarded, said in one warning line
    on stderr, and False lets the recorder put `locked: false` in the record."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            raise ReproError(f"{directory} is being trained by another process; wait for it "
                             "or stop it (`status` shows the run as running)") from None
        except OSError as e:
            locked = False
            print(f"warning: cannot lock {directory} ({e.strerror or e}): the file system "
                  "takes no locks, so nothing stops a second process training this run "
                  "(its record says locked: false)", file=sys.stderr, flush=True)
        yield locked
    finally:
        os.close(fd)


def is_locked(directory: Path) -> bool:
    """True while some process holds `run_lock` on the folder (that run is training now)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
