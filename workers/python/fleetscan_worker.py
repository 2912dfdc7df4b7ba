#!/usr/bin/env python3
"""A fleetscan scanner worker in Python, built from the .proto files alone.

This is the proof that a scanner vendor needs nothing but the wire contract
(`proto/fleetscan/v1/worker.proto`, `common.proto`) and `docs/worker-protocol.md`:
the Python modules are generated at start-up with `grpc_tools.protoc` into
`.generated/` next to this file (gitignored: nothing generated is committed), and the worker speaks the
`/fleetscan.v1.WorkerService/Attach` stream directly.

The "engine" is a toy: the 68-byte EICAR test string at offset 0 is MALICIOUS
("EICAR-Test-File"), everything else is CLEAN. Replace `scan()` with a real engine.

What this worker must never do (worker-protocol.md): answer a job twice, answer a
cancelled job, buffer more than `Job.size` (or its `max_file_size`) for a job, scan
content whose SHA-256 differs from `Job.sha256`, block the stream while scanning,
or grant a credit back before a job has left it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib
import logging
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import grpc

LOG = logging.getLogger("fleetscan-python-worker")

SCANNER = "python-sample"
ENGINE = "python-eicar"
ENGINE_VERSION = "1.0.0"
RULESET_VERSION = "eicar-1"

# The standard 68-byte EICAR anti-virus test string.
EICAR = (
    b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
)
assert len(EICAR) == 68

DEFAULT_CREDITS = 4
# Largest content we accept. The broker never sends more; we still check every chunk.
MAX_FILE_SIZE = 64 * 1024 * 1024
# worker-protocol.md: at least every 10 s. We send every 5 s.
HEARTBEAT_INTERVAL_S = 5.0
REGISTER_TIMEOUT_S = 10.0
SILENCE_TIMEOUT_S = 30.0
# Used when a job's `deadline_ms` is 0.
DEFAULT_JOB_DEADLINE_S = 30.0
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0
# Messages are at most 4 MiB each way (MAX_MESSAGE_SIZE); leave headroom.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Statuses that will be refused the same way again: stop instead of reconnecting.
FATAL_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
}
HEX = set("0123456789abcdefABCDEF")


# --------------------------------------------------------------------------- codegen


def generate_modules(proto_dir: str, cache_root: str):
    """Generate (or reuse) the modules of worker.proto and common.proto.

    They go to `cache_root/<key>/`, the key being a digest of the two .proto files and
    of the grpcio-tools version, so a changed contract or tool regenerates them and a
    killed worker leaves nothing half-written (each generation goes to a temporary
    directory first and is renamed into place). `cache_root` is gitignored: nothing
    generated is committed. Returns (worker_pb2, worker_pb2_grpc, common_pb2).
    """
    import grpc_tools
    from grpc_tools import protoc  # imported here: only needed at start-up

    try:
        import importlib.resources as resources

        well_known = str(resources.files("grpc_tools") / "_proto")
    except Exception:  # pragma: no cover - very old Pythons
        import pkg_resources

        well_known = pkg_resources.resource_filename("grpc_tools", "_proto")

    files = [
        os.path.join(proto_dir, "fleetscan", "v1", "common.proto"),
        os.path.join(proto_dir, "fleetscan", "v1", "worker.proto"),
    ]
    key = hashlib.sha256()
    try:
        from importlib.metadata import version

        key.update(version("grpcio-tools").encode())
        key.update(version("protobuf").encode())
    except Exception:
        key.update(os.path.dirname(grpc_tools.__file__).encode())
    for f in files:
        if not os.path.isfile(f):
            raise SystemExit(f"proto file not found: {f} (use --proto-dir)")
        with open(f, "rb") as fh:
            key.update(fh.read())
    out_dir = os.path.join(cache_root, key.hexdigest()[:16])
    if not os.path.isdir(out_dir):
        os.makedirs(cache_root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_root)
        try:
            rc = protoc.main([
                "grpc_tools.protoc",
                f"-I{proto_dir}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                *files,
            ])
            if rc != 0:
                raise SystemExit(f"grpc_tools.protoc failed with exit code {rc}")
            # protoc emits `from fleetscan.v1 import common_pb2`: make the packages importable.
            for pkg in ("fleetscan", os.path.join("fleetscan", "v1")):
                open(os.path.join(tmp, pkg, "__init__.py"), "a").close()
            try:
                os.rename(tmp, out_dir)
            except OSError:
                pass  # another worker generated the same key first: use theirs
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    sys.path.insert(0, out_dir)
    common_pb2 = importlib.import_module("fleetscan.v1.common_pb2")
    pb2 = importlib.import_module("fleetscan.v1.worker_pb2")
    pb2_grpc = importlib.import_module("fleetscan.v1.worker_pb2_grpc")
    return pb2, pb2_grpc, common_pb2


# --------------------------------------------------------------------------- engine


@dataclass
class Verdict:
    result: int
    threat_name: str = ""
    detail: str = ""
    retryable: bool = False


def scan(content: bytes, common_pb2) -> Verdict:
    """The toy engine: EICAR at offset 0 is malicious, the rest is clean.

    It reads the whole content (the hash was already checked over all of it), so CLEAN
    means the whole content was looked at.
    """
    if content[: len(EICAR)] == EICAR:
        return Verdict(common_pb2.VERDICT_RESULT_MALICIOUS, threat_name="EICAR-Test-File")
    return Verdict(common_pb2.VERDICT_RESULT_CLEAN)


# --------------------------------------------------------------------------- session


@dataclass
class HeldJob:
    job_id: int
    sha256: str
    size: int
    deadline: float  # monotonic time after which incomplete content is dropped
    buf: bytearray = field(default_factory=bytearray)
    scanning: bool = False
    cancelled: bool = False


class Session:
    """One Attach stream: its outgoing queue, its jobs and its credits.

    Job ids and credits belong to the stream, so everything here dies with it. Scans
    still running when the stream ends finish, but their results are dropped.
    """

    _CLOSE = object()

    def __init__(self, worker: "Worker"):
        self.w = worker
        self.pb2 = worker.pb2
        self.common = worker.common_pb2
        # Unbounded by count, but bounded in practice: the worker only enqueues a few
        # control messages per job it holds, and it holds at most `credits` jobs.
        self.out: "queue.Queue[object]" = queue.Queue()
        self.lock = threading.Lock()
        self.jobs: dict[int, HeldJob] = {}
        self.available = 0  # credits granted and not yet used by a Job
        self.registered = threading.Event()
        self.done = threading.Event()
        self.closed = False
        self.last_heard = time.monotonic()
        self.opened_at = time.monotonic()
        self.call = None
        self.error: Optional[grpc.RpcError] = None

    # -- outgoing

    def requests(self):
        """The request iterator: Register first, before waiting for anything."""
        yield self.pb2.WorkerMessage(register=self.w.register_msg())
        while True:
            item = self.out.get()
            if item is Session._CLOSE:
                return  # half-close our side
            yield item

    def send(self, **kw) -> None:
        with self.lock:
            if self.closed:
                return
        self.out.put(self.pb2.WorkerMessage(**kw))

    def grant(self, n: int) -> None:
        if n <= 0 or self.w.stopping.is_set():
            return
        with self.lock:
            if self.closed:
                return
            self.available += n
        LOG.debug("granting %d credit(s)", n)
        self.out.put(self.pb2.WorkerMessage(credit=self.pb2.Credit(credits=n)))

    def answer(self, job_id: int, v: Verdict, scan_micros: int = 0) -> None:
        self.send(
            result=self.pb2.ScanResult(
                job_id=job_id,
                result=v.result,
                threat_name=v.threat_name,
                detail=v.detail,
                retryable=v.retryable,
                scan_micros=scan_micros,
            )
        )

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.out.put(Session._CLOSE)

    # -- incoming

    def read(self) -> None:
        try:
            for cmd in self.call:
                self.last_heard = time.monotonic()
                self.handle(cmd)
        except grpc.RpcError as e:
            self.error = e
        except Exception:  # a bug here must not leave the stream half-alive
            LOG.exception("reader failed")
            self.call.cancel()
        finally:
            with self.lock:
                self.closed = True
            self.out.put(Session._CLOSE)
            self.done.set()

    def handle(self, cmd) -> None:
        kind = cmd.WhichOneof("msg")
        if kind == "registered":
            LOG.info(
                "registered with broker %s (chunk size %d)",
                cmd.registered.broker_id,
                cmd.registered.chunk_size,
            )
            self.registered.set()
            self.w.on_registered()
            self.grant(self.w.credits)
        elif not self.registered.is_set():
            LOG.warning("ignoring %s before Registered", kind)
        elif kind == "job":
            self.on_job(cmd.job)
        elif kind == "chunk":
            self.on_chunk(cmd.chunk)
        elif kind == "cancel":
            self.on_cancel(cmd.cancel)
        elif kind == "heartbeat":
            pass  # any message counts against the silence timeout
        else:
            LOG.debug("ignoring unknown command %r", kind)

    def on_job(self, job) -> None:
        def refuse(detail: str, retryable: bool, give_back: bool) -> None:
            LOG.info("refusing job %d: %s", job.job_id, detail)
            self.answer(
                job.job_id,
                Verdict(self.common.VERDICT_RESULT_ERROR, detail=detail, retryable=retryable),
            )
            if give_back:
                self.grant(1)

        with self.lock:
            beyond = self.available <= 0 or self.w.stopping.is_set()
            duplicate = job.job_id in self.jobs
            if not beyond and not duplicate:
                self.available -= 1
        if duplicate:
            LOG.warning("ignoring a second Job %d", job.job_id)
            return
        if self.w.stopping.is_set():
            refuse("worker is shutting down", True, False)
            return
        if beyond:
            # Not held, and it used no credit of ours: nothing to give back.
            refuse("job beyond the credits granted", True, False)
            return
        if len(job.sha256) != 64 or not set(job.sha256) <= HEX:
            refuse("sha256 is not 64 hex digits", False, True)
            return
        if job.size > MAX_FILE_SIZE:
            refuse(f"size {job.size} over max_file_size {MAX_FILE_SIZE}", True, True)
            return
        deadline_s = job.deadline_ms / 1000.0 if job.deadline_ms else DEFAULT_JOB_DEADLINE_S
        held = HeldJob(
            job_id=job.job_id,
            sha256=job.sha256.lower(),
            size=job.size,
            deadline=time.monotonic() + deadline_s,
        )
        with self.lock:
            self.jobs[job.job_id] = held
        LOG.debug("job %d: %d bytes, attempt %d", job.job_id, job.size, job.attempt)

    def drop(self, job_id: int, detail: str, retryable: bool) -> None:
        """Answer a job still being received with ERROR and free its slot."""
        with self.lock:
            held = self.jobs.pop(job_id, None)
        if held is None:
            return
        LOG.info("dropping job %d: %s", job_id, detail)
        self.answer(
            job_id, Verdict(self.common.VERDICT_RESULT_ERROR, detail=detail, retryable=retryable)
        )
        self.grant(1)

    def on_chunk(self, chunk) -> None:
        # Decide under the lock (the ticker may drop a job at its deadline meanwhile);
        # answer outside it.
        problem = None
        with self.lock:
            held = self.jobs.get(chunk.job_id)
            if held is None or held.scanning:
                return  # unknown, refused or cancelled job: its ids are ignored
            if chunk.offset != len(held.buf):
                problem = (f"chunk at offset {chunk.offset}, expected {len(held.buf)}", True)
            elif len(held.buf) + len(chunk.data) > held.size:
                # Checked before buffering: never hold more than Job.size.
                problem = ("more content than the declared size", False)
            else:
                held.buf += chunk.data
                if chunk.last:
                    if len(held.buf) != held.size:
                        problem = ("last chunk before the declared size", False)
                    else:
                        held.scanning = True
        if problem is not None:
            self.drop(chunk.job_id, *problem)
        elif held.scanning:
            self.w.pool.submit(self.run_scan, held)

    def on_cancel(self, cancel) -> None:
        with self.lock:
            held = self.jobs.get(cancel.job_id)
            if held is None:
                return
            held.cancelled = True
            if held.scanning:
                # The scan cannot be interrupted: its slot comes back when it ends.
                LOG.info("job %d cancelled while scanning (%s)", cancel.job_id, cancel.reason)
                return
            del self.jobs[cancel.job_id]
        LOG.info("job %d cancelled while receiving (%s)", cancel.job_id, cancel.reason)
        self.grant(1)

    def run_scan(self, held: HeldJob) -> None:
        """In the scan pool: hash, scan, answer (unless cancelled), grant one credit."""
        try:
            start = time.perf_counter_ns()
            content = bytes(held.buf)
            held.buf = bytearray()  # keep no content after the scan
            digest = hashlib.sha256(content).hexdigest()
            if digest != held.sha256:
                v = Verdict(
                    self.common.VERDICT_RESULT_ERROR, detail="sha256 mismatch", retryable=False
                )
            else:
                try:
                    v = scan(content, self.common)
                except Exception as e:  # an engine failure is an ERROR, never CLEAN
                    LOG.exception("scan of job %d failed", held.job_id)
                    v = Verdict(self.common.VERDICT_RESULT_ERROR, detail=f"scan failed: {e}",
                                retryable=True)
            micros = max(1, (time.perf_counter_ns() - start) // 1000)
        except Exception as e:
            LOG.exception("job %d failed", held.job_id)
            v, micros = Verdict(self.common.VERDICT_RESULT_ERROR, detail=str(e), retryable=True), 1
        with self.lock:
            self.jobs.pop(held.job_id, None)
            cancelled = held.cancelled
        if cancelled:
            LOG.info("job %d: result dropped, the job was cancelled", held.job_id)
        else:
            LOG.info("job %d: %s %s", held.job_id,
                     self.common.VerdictResult.Name(v.result), v.threat_name or v.detail)
            self.answer(held.job_id, v, micros)
        self.grant(1)

    # -- timers (called by the session's ticker)

    def tick(self, now: float) -> None:
        with self.lock:
            late = [j.job_id for j in self.jobs.values() if not j.scanning and now > j.deadline]
        for job_id in late:
            self.drop(job_id, "content incomplete at the job deadline", True)


# --------------------------------------------------------------------------- worker


class Worker:
    def __init__(self, target: str, credits: int, pool: str, tenants: list[str],
                 pb2, pb2_grpc, common_pb2):
        self.target = target
        self.credits = credits
        self.pool_name = pool
        self.tenants = tenants
        self.pb2, self.pb2_grpc, self.common_pb2 = pb2, pb2_grpc, common_pb2
        self.stopping = threading.Event()
        self.backoff = BACKOFF_START_S
        # Scans run here, never on the reader: the stream keeps flowing while scanning.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, credits),
                                                          thread_name_prefix="scan")
        self.session: Optional[Session] = None

    def register_msg(self):
        return self.pb2.Register(
            worker_name=f"{socket.gethostname()}-{os.getpid()}",
            scanner=self.common_pb2.ScannerIdentity(
                scanner=SCANNER,
                engine=ENGINE,
                engine_version=ENGINE_VERSION,
                ruleset_version=RULESET_VERSION,
            ),
            pool="",
            tenants=self.tenants,
            max_file_size=MAX_FILE_SIZE,
            content_types=["application/octet-stream"],
        )

    def on_registered(self) -> None:
        self.backoff = BACKOFF_START_S  # reset after each successful registration

    def run(self) -> int:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_http_proxy", 0),
            # Reconnect quickly after a broker restart; our own backoff paces attempts.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        while not self.stopping.is_set():
            with grpc.insecure_channel(self.target, options=options) as channel:
                stub = self.pb2_grpc.WorkerServiceStub(channel)
                code = self.run_session(stub)
            if self.stopping.is_set():
                break
            if code in FATAL_CODES:
                LOG.error("broker refused the worker with %s; not retrying", code)
                return 1
            LOG.info("stream ended (%s); reconnecting in %.1f s", code, self.backoff)
            self.stopping.wait(self.backoff)
            self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)
        return 0

    def run_session(self, stub):
        s = Session(self)
        self.session = s
        s.call = stub.Attach(s.requests())
        reader = threading.Thread(target=s.read, name="reader", daemon=True)
        reader.start()
        next_heartbeat = None
        while not s.done.wait(0.2):
            now = time.monotonic()
            if self.stopping.is_set():
                self.shutdown(s)
                break
            if not s.registered.is_set():
                if now - s.opened_at > REGISTER_TIMEOUT_S:
                    LOG.warning("no Registered within %.0f s", REGISTER_TIMEOUT_S)
                    s.call.cancel()
                continue
            if now - s.last_heard > SILENCE_TIMEOUT_S:
                LOG.warning("broker silent for %.0f s; leaving", SILENCE_TIMEOUT_S)
                s.call.cancel()
                continue
            if next_heartbeat is None:
                next_heartbeat = now + HEARTBEAT_INTERVAL_S
            elif now >= next_heartbeat:
                s.send(heartbeat=self.common_pb2.Heartbeat(sent_at_unix_ms=int(time.time() * 1000)))
                next_heartbeat = now + HEARTBEAT_INTERVAL_S
            s.tick(now)
        reader.join(timeout=2)
        s.close()
        if s.error is not None:
            return s.error.code()
        return grpc.StatusCode.OK

    def shutdown(self, s: Session) -> None:
        """Drain: no new credits; refuse jobs being received; let running scans answer."""
        LOG.info("shutting down")
        with s.lock:
            receiving = [j.job_id for j in s.jobs.values() if not j.scanning]
        for job_id in receiving:
            s.drop(job_id, "worker is shutting down", True)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            with s.lock:
                if not s.jobs:
                    break
            if s.done.wait(0.1):
                return
        s.close()  # half-close, then give the broker 2 s to end its side
        if not s.done.wait(2):
            s.call.cancel()


def broker_target(url: str) -> str:
    for scheme in ("http://", "https://", "grpc://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    return url.rstrip("/")


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    default_proto = os.path.normpath(os.path.join(here, "..", "..", "proto"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", default=os.environ.get("FLEETSCAN_WORKER_BROKER"),
                   help="broker URL, e.g. http://127.0.0.1:7700 "
                        "(default: $FLEETSCAN_WORKER_BROKER, else http://127.0.0.1:7700)")
    p.add_argument("--credits", type=int, default=DEFAULT_CREDITS,
                   help="jobs held at once (default %(default)s)")
    p.add_argument("--tenant", action="append", default=[],
                   help="tenant whose jobs to take (repeatable; default: the broker's)")
    p.add_argument("--proto-dir", default=default_proto,
                   help="directory holding fleetscan/v1/*.proto (default %(default)s)")
    p.add_argument("--cache-dir", default=os.path.join(here, ".generated"),
                   help="where the generated modules are kept (gitignored; default %(default)s)")
    p.add_argument("--log-level", default=os.environ.get("FLEETSCAN_LOG", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.credits < 1:
        p.error("--credits must be at least 1")
    broker = args.broker or "http://127.0.0.1:7700"

    pb2, pb2_grpc, common_pb2 = generate_modules(args.proto_dir, args.cache_dir)
    worker = Worker(broker_target(broker), args.credits, "", args.tenant,
                    pb2, pb2_grpc, common_pb2)

    def on_signal(signum, _frame):
        LOG.info("received %s", signal.Signals(signum).name)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    LOG.info("attaching to %s as %s/%s", broker, SCANNER, ENGINE)
    rc = worker.run()
    worker.pool.shutdown(wait=False, cancel_futures=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
