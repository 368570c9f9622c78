"""Downloads run in a spawned child process. boto3 and its HTTP/TLS stack never enter the daemon
(its resident memory: docs/benchmarks.md), and reading and hashing a large object never competes with the
daemon's threads for the GIL. A cancelled download is killed; its .part stays for the next resume."""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from agent.config import S3Config
from agent.delivery.s3_fetch import Wanted
from agent.errors import Cancelled, DiskFull, FetchError
from agent.proc import durable
from agent.proc.child import die_with_parent, exit_reason
from agent.proc.sched import start_in_background

_MP = multiprocessing.get_context("spawn")
POLL_S = 0.1
PROGRESS_STEP = 1 << 20


# -- what the download child sends ------------------------------------------------------------------
@dataclass(frozen=True)
class Received:
    done: int
    total: int


@dataclass(frozen=True)
class Refused:
    reason: str
    no_space: bool = False  # the disk, not the model: the candidate waits for space


@dataclass(frozen=True)
class Complete:
    pass


ChildMessage = Received | Refused | Complete


def download(
    s3: S3Config,
    want: Wanted,
    *,
    reserve_bytes: int,
    progress: Callable[[int, int], None],
    cancel: threading.Event,
) -> None:
    """agent.delivery.s3_fetch.fetch in a child; FetchError with its reason, Cancelled when `cancel` is set."""
    recv, send = _MP.Pipe(duplex=False)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    proc = _MP.Process(target=_child, args=(s3, want, reserve_bytes, send, level), name="download", daemon=True)
    start_in_background(proc)
    send.close()
    try:
        _follow(proc, recv, progress, cancel)
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        recv.close()


def _follow(
    proc: multiprocessing.process.BaseProcess,
    recv: Connection,
    progress: Callable[[int, int], None],
    cancel: threading.Event,
) -> None:
    while not cancel.is_set():
        if not recv.poll(POLL_S):
            continue
        try:
            msg: ChildMessage = recv.recv()
        except EOFError:
            proc.join(5)
            why = exit_reason(proc.exitcode or 0, "the download process")
            raise FetchError(f"the download process ended without a result: {why}") from None
        match msg:
            case Received():
                progress(msg.done, msg.total)
            case Refused():
                raise DiskFull(msg.reason) if msg.no_space else FetchError(msg.reason)
            case Complete():
                return
    raise Cancelled("the agent is stopping")


def _child(s3: S3Config, want: Wanted, reserve_bytes: int, conn: Connection, log_level: str) -> None:
    from agent.delivery.s3_fetch import fetch, s3_client
    from agent.proc import logsetup

    logsetup.setup(log_level)  # the daemon's stderr (or journal): resumes and retries show there
    die_with_parent("edge-download")
    sent = [0]

    def report(done: int, total: int) -> None:
        if done == total or done - sent[0] >= PROGRESS_STEP:
            sent[0] = done
            conn.send(Received(done, total))

    try:
        client = s3_client(s3.endpoint_url, s3.region, s3.connect_timeout_s, s3.read_timeout_s)
        fetch(client, want, reserve_bytes=reserve_bytes, progress=report, max_mbps=s3.max_download_mbps)
        conn.send(Complete())
    except FetchError as err:
        conn.send(Refused(err.reason))
    except DiskFull as err:
        conn.send(Refused(str(err), no_space=True))
    except Exception as err:  # anything else still comes back as a reason
        conn.send(Refused(f"{type(err).__name__}: {err}", no_space=durable.no_space(err)))
    conn.close()
