"""The NeXus writer out of process: a safe 0MQ publisher, proxy and writer service.

::

    nxrefine-bs proxy                                 # 127.0.0.1:5577 in, :5578 out
    nxrefine-bs writer --zmq 127.0.0.1:5578           # the NeXus writer service

and in the RunEngine session ``RE.subscribe(Publisher("127.0.0.1:5577"))``.

Safe by default:

* everything binds to 127.0.0.1 unless told otherwise (``--host``);
* documents travel as **msgpack** (numpy arrays as lists), never pickle: a pickled
  payload is rejected and logged by the writer (it cannot execute code);
* optional 0MQ CURVE encryption and client authentication for a network deployment
  (``nxrefine-bs zmq-keys DIR`` makes the key pairs; pass ``--curve DIR``);
* each message carries its run uid and a per-run sequence number; the proxy keeps the
  documents of recent runs, so a writer that was killed and restarted mid-run asks the
  proxy for what it missed (on a gap in the sequence, and at start-up for every recent
  run whose scan file it does not find finished) -- no rotation is silently absent;
* the writer logs "listening on ..." and one line per run; SIGTERM flushes and exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import msgpack
import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .nexus_writer import NeXusScanWriter
from .reduction import PostScanReduction
from .run_writer import scan_file_for_start

logger = logging.getLogger(__name__)

__all__ = ["Publisher", "run_proxy", "serve", "make_keys", "encode", "decode"]

DEFAULT_IN, DEFAULT_OUT = 5577, 5578
HISTORY_RUNS = 50
"""Runs whose documents the proxy keeps for writers that need to catch up."""


# ---------------------------------------------------------------------- serialisation
def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} in a document")


def encode(envelope: dict[str, Any]) -> bytes:
    """msgpack bytes of a message envelope ``{run, seq, name, doc}``."""
    return msgpack.packb(envelope, default=_default, use_bin_type=True)


def decode(payload: bytes) -> dict[str, Any]:
    """Decode and check a message; raises ValueError for anything but an envelope."""
    try:
        msg = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:
        raise ValueError(f"not a msgpack document envelope ({exc.__class__.__name__})") from None
    if (
        not isinstance(msg, dict)
        or not isinstance(msg.get("name"), str)
        or not isinstance(msg.get("doc"), dict)
        or not isinstance(msg.get("run"), str)
        or not isinstance(msg.get("seq"), int)
    ):
        raise ValueError("message is not a {run, seq, name, doc} envelope")
    return msg


# ---------------------------------------------------------------------- CURVE keys
def make_keys(directory: str | Path) -> Path:
    """Create CURVE key pairs ``server`` and ``client`` in ``directory`` (mode 0700)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("server", "client"):
        if not (directory / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(str(directory), name)
    return directory


def _curve_server(sock: zmq.Socket, directory: Path) -> None:
    public, secret = zmq.auth.load_certificate(str(directory / "server.key_secret"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def _curve_client(sock: zmq.Socket, directory: Path) -> None:
    public, secret = zmq.auth.load_certificate(str(directory / "client.key_secret"))
    server_public, _ = zmq.auth.load_certificate(str(directory / "server.key"))
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


def _start_authenticator(ctx: zmq.Context, directory: Path) -> Any:
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(directory))  # trusts *.key there
    return auth


def _address(address: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {address!r} must be HOST:PORT")
    return f"tcp://{host}:{port}"


# ---------------------------------------------------------------------- publisher
class Publisher:
    """Bluesky callback publishing documents to the proxy as msgpack envelopes.

    Parameters
    ----------
    address : str
        ``host:port`` of the proxy's input side (default 127.0.0.1:5577).
    curve : path-like, optional
        Directory made by :func:`make_keys` (enables CURVE encryption).
    """

    def __init__(
        self,
        address: str = f"127.0.0.1:{DEFAULT_IN}",
        *,
        curve: Any = None,
        connect_timeout: float = 10.0,
    ) -> None:
        self._ctx = zmq.Context()
        # XPUB, not PUB: the proxy's subscription arrives as a message, so we know when
        # documents stop being dropped (0MQ's "slow joiner").
        self._sock = self._ctx.socket(zmq.XPUB)
        self._sock.setsockopt(zmq.LINGER, 2000)
        if curve is not None:
            _curve_client(self._sock, Path(curve))
        self._sock.connect(_address(address))
        self.connected = bool(self._sock.poll(int(connect_timeout * 1000)))
        if self.connected:
            self._sock.recv()
        else:
            logger.warning(
                "no 0MQ proxy answered on %s within %s s; documents published before it "
                "does are lost (start it with 'nxrefine-bs proxy')",
                address,
                connect_timeout,
            )
        self._runs: dict[str, str] = {}  # descriptor/resource uid -> run uid
        self._seq: dict[str, int] = {}
        self._lock = threading.Lock()

    def _run_of(self, name: str, doc: dict[str, Any]) -> str:
        if name == "start":
            return str(doc["uid"])
        if name in ("descriptor", "stop"):
            run = str(doc.get("run_start", ""))
            if name == "descriptor":
                self._runs[str(doc["uid"])] = run
            return run
        if name in ("stream_resource", "resource"):
            run = str(doc.get("run_start") or next(reversed(self._seq), ""))
            self._runs[str(doc.get("uid"))] = run
            return run
        for key in ("descriptor", "stream_resource", "resource"):
            if key in doc and str(doc[key]) in self._runs:
                return self._runs[str(doc[key])]
        return next(reversed(self._seq), "")

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        with self._lock:
            run = self._run_of(name, doc)
            seq = self._seq.get(run, -1) + 1
            self._seq[run] = seq
            if name == "stop":
                self._seq.pop(run, None)
                for key in [k for k, v in self._runs.items() if v == run]:
                    del self._runs[key]
            self._sock.send(encode({"run": run, "seq": seq, "name": name, "doc": dict(doc)}))

    def close(self) -> None:
        """Close the socket and its context."""
        self._sock.close()
        self._ctx.term()


# ---------------------------------------------------------------------- proxy
def run_proxy(
    host: str = "127.0.0.1",
    in_port: int = DEFAULT_IN,
    out_port: int = DEFAULT_OUT,
    *,
    curve: Path | None = None,
    stop: threading.Event | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Forward envelopes from publishers to writers, keeping recent runs for catch-up.

    Binds ``in_port`` (SUB, publishers connect), ``out_port`` (PUB, writers connect) and
    ``out_port + 1`` (REP: ``{"history": uid}`` and ``{"runs": true}`` requests).
    Messages that are not msgpack envelopes are dropped with a warning.
    """
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    ctx = zmq.Context()
    auth = _start_authenticator(ctx, curve) if curve is not None else None
    front, back, rep = ctx.socket(zmq.SUB), ctx.socket(zmq.PUB), ctx.socket(zmq.REP)
    for sock in (front, back, rep):
        sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            _curve_server(sock, curve)
    front.setsockopt(zmq.SUBSCRIBE, b"")
    front.bind(f"tcp://{host}:{in_port}")
    back.bind(f"tcp://{host}:{out_port}")
    rep.bind(f"tcp://{host}:{out_port + 1}")
    history: OrderedDict[str, list[bytes]] = OrderedDict()
    finished: set[str] = set()
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(rep, zmq.POLLIN)
    logger.info("proxy listening on %s:%d, publishing on %s:%d", host, in_port, host, out_port)
    if ready is not None:
        ready()
    try:
        while not stop.is_set():
            events = dict(poller.poll(200))
            if front in events:
                payload = front.recv()
                try:
                    msg = decode(payload)
                except ValueError as exc:
                    logger.warning("proxy: dropped a message: %s", exc)
                    continue
                run = msg["run"]
                history.setdefault(run, []).append(payload)
                history.move_to_end(run)
                if msg["name"] == "stop":
                    finished.add(run)
                while len(history) > HISTORY_RUNS:
                    old, _ = history.popitem(last=False)
                    finished.discard(old)
                back.send(payload)
            if rep in events:
                try:
                    req = msgpack.unpackb(rep.recv(), raw=False)
                except Exception:
                    rep.send(msgpack.packb({"error": "bad request"}))
                    continue
                if isinstance(req, dict) and isinstance(req.get("history"), str):
                    rep.send(msgpack.packb({"docs": history.get(req["history"], [])}))
                elif isinstance(req, dict) and req.get("runs"):
                    rep.send(msgpack.packb({"runs": list(history)}))
                else:
                    rep.send(msgpack.packb({"error": "bad request"}))
    finally:
        for sock in (front, back, rep):
            sock.close()
        if auth is not None:
            auth.stop()
        ctx.term()


# ---------------------------------------------------------------------- writer service
class _Catchup:
    """Feeds envelopes to the callbacks in order, fetching missed ones from the proxy."""

    def __init__(self, callbacks: Sequence[Callable[[str, dict[str, Any]], Any]], req: Any):
        self.callbacks = list(callbacks)
        self.req = req  # callable(request dict) -> reply dict
        self.seen: OrderedDict[str, int] = OrderedDict()

    def _deliver(self, msg: dict[str, Any]) -> None:
        name, doc = msg["name"], msg["doc"]
        if name == "start":
            logger.info(
                "run %s started: %s/%s %s %s",
                doc.get("uid"),
                doc.get("sample"),
                doc.get("label"),
                doc.get("scan"),
                doc.get("entry"),
            )
        for cb in self.callbacks:
            try:
                cb(name, doc)
            except Exception as exc:
                logger.error("run %s: %s document refused: %s", msg["run"], name, exc)
        if name == "stop":
            logger.info("run %s stopped: %s", msg["run"], doc.get("exit_status"))
        self.seen[msg["run"]] = msg["seq"]
        while len(self.seen) > 10 * HISTORY_RUNS:
            self.seen.popitem(last=False)

    def handle(self, msg: dict[str, Any]) -> None:
        last = self.seen.get(msg["run"], -1)
        if msg["seq"] <= last:
            return  # already delivered (from the history)
        if msg["seq"] != last + 1:
            self.catch_up(msg["run"])
            if msg["seq"] <= self.seen.get(msg["run"], -1):
                return
        self._deliver(msg)

    def catch_up(self, run: str, *, unless_written: bool = False) -> int:
        """Deliver the documents of ``run`` that this writer has not seen; return how many.

        With ``unless_written``, a run whose scan-file entry already records it as
        finished (by an earlier writer process) is skipped.
        """
        try:
            reply = self.req({"history": run})
        except Exception as exc:
            logger.error("cannot fetch the history of run %s from the proxy: %s", run, exc)
            return 0
        docs = reply.get("docs", [])
        if unless_written and docs and _written(decode(docs[0])):
            self.seen[run] = decode(docs[-1])["seq"]
            return 0
        last = self.seen.get(run, -1)
        count = 0
        for payload in docs:
            msg = decode(payload)
            if msg["seq"] > last:
                self._deliver(msg)
                last = msg["seq"]
                count += 1
        if count:
            logger.warning("run %s: caught up on %d missed documents from the proxy", run, count)
        return count


def _written(first: dict[str, Any]) -> bool:
    """True if the scan file already records the run of start envelope ``first`` as ended."""
    if first["name"] != "start" or "nxrefine" not in first["doc"]:
        return True  # not a run this writer writes
    try:
        _, scan_file, entry = scan_file_for_start(first["doc"])
        with h5py.File(scan_file, "r") as f:
            acq = f[f"{entry}/acquisition"]
            uid = acq["run_uid"][()].decode()
            status = acq["status"][()].decode()
    except Exception:
        return False
    return uid == first["doc"].get("uid") and status != "running"


def serve(
    address: str = f"127.0.0.1:{DEFAULT_OUT}",
    *,
    reduce_steps: Sequence[str] = (),
    curve: Path | None = None,
    stop: threading.Event | None = None,
    ready: Callable[[], None] | None = None,
) -> int:
    """Run the NeXus writer on documents from the proxy until SIGTERM/SIGINT or ``stop``.

    At start-up it asks the proxy for its recent runs and replays the ones it has not
    seen, so a restarted writer finishes a rotation it missed.  Returns 0.
    """
    writer = NeXusScanWriter()
    callbacks: list[Any] = [writer]
    if reduce_steps:
        callbacks.append(PostScanReduction(steps=tuple(reduce_steps), writer=writer))
    ctx = zmq.Context()
    sub, req = ctx.socket(zmq.SUB), None
    sub.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        _curve_client(sub, curve)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(_address(address))
    host, _, port = address.rpartition(":")
    req_address = f"{host}:{int(port) + 1}"

    def request(body: dict[str, Any]) -> dict[str, Any]:
        nonlocal req
        if req is None:
            req = ctx.socket(zmq.REQ)
            req.setsockopt(zmq.LINGER, 0)
            req.setsockopt(zmq.RCVTIMEO, 10000)
            req.setsockopt(zmq.SNDTIMEO, 10000)
            if curve is not None:
                _curve_client(req, curve)
            req.connect(_address(req_address))
        try:
            req.send(msgpack.packb(body))
            return msgpack.unpackb(req.recv(), raw=False)
        except zmq.Again:
            req.close()
            req = None
            raise TimeoutError(f"the proxy at {req_address} does not answer") from None

    catchup = _Catchup(callbacks, request)
    stopping = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
    logger.info("NeXus writer listening on %s", address)
    with contextlib.suppress(Exception):
        for run in request({"runs": True}).get("runs", []):
            catchup.catch_up(run, unless_written=True)
    if ready is not None:
        ready()
    try:
        while not stopping.is_set():
            if not sub.poll(200):
                continue
            payload = sub.recv()
            try:
                msg = decode(payload)
            except ValueError as exc:
                logger.warning("rejected a message: %s", exc)
                continue
            catchup.handle(msg)
    finally:
        writer.close(timeout=120)
        for cb in callbacks[1:]:
            with contextlib.suppress(Exception):
                cb.wait(120)
                cb.close()
        sub.close()
        if req is not None:
            req.close()
        ctx.term()
        logger.info("NeXus writer stopped")
    return 0
