"""One copy out of or into a shared memory region whose file the client truncates after the server's
check and before the copy (the race a same-user client can win), in a process of its own: without
the SIGBUS guard (domain/shm.py, `_native.c`) the process dies with SIGBUS, so tests/test_shm_truncation.py
runs this and reads the exit status and the last line.

Usage: python tests/shm_truncation_scenario.py KEY MODE   (MODE: numpy, threads, stream, crc, unguarded)
Prints 'refused: <message>' then 'after: <message>' (the region refusing later copies even once the
file has its size again), or 'copied' where nothing was noticed.
"""

import os
import sys
import zlib

import torch

from weightavg_server.domain import native, shm
from weightavg_server.domain.errors import FailedPrecondition

SIZE = 8 << 20


def copy(region: shm.Region, mode: str) -> None:
    source = region.bytes_at(0, SIZE, "t")
    target = torch.empty(SIZE, dtype=torch.uint8)
    if mode == "numpy":  # an upload's copy out of the region on one thread (numpy or streaming stores)
        shm.copy_bytes(target, source)
    elif mode == "threads":  # torch's copy on its intra-op (OpenMP) threads
        shm.copy_bytes(target, source, threads=True)
    elif mode == "stream":  # a fetch's streaming copies into the region on the native threads
        assert native.stream_copies([(source, torch.ones(SIZE, dtype=torch.uint8))], 2) == []
    elif mode == "crc":  # the upload digest's read of the region's bytes
        with memoryview(region.buffer) as mapped:
            zlib.crc32(mapped)
    elif mode == "unguarded":  # the control: the same copy with the guard released
        region._guard.release()
        shm.copy_bytes(target, source)


def main(key: str, mode: str) -> None:
    path = os.path.join(shm.SHM_DIRECTORY, key)
    region = shm.Region(key, SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        with region.copying():  # checked here: the file has its size and its memory
            os.ftruncate(fd, 0)  # the client's truncation, won the race
            copy(region, mode)
        print("copied", flush=True)
    except FailedPrecondition as exc:
        print(f"refused: {exc}", flush=True)
    os.ftruncate(fd, SIZE)
    os.posix_fallocate(fd, 0, SIZE)
    try:
        with region.copying():
            pass
    except FailedPrecondition as exc:
        print(f"after: {exc}", flush=True)
    os.close(fd)
    region.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
