"""The socket between the controller and its status server process.

Each message is a pickled tuple, framed by its length (4 bytes, big-endian). The same `Link`
serves both ends. What it promises the controller's loop:

- `send` never blocks. It queues the frame and writes what the socket takes now; the rest waits
  in a backlog that a flusher thread writes out as the peer reads. The thread that holds the
  writer's lock writes every queued frame, so a thread that finds it held (another writer, or a
  signal handler on the thread that holds it) returns at once and its frame still goes out, in
  order, whole.
- A peer that has gone away (or stopped reading for `MAX_BACKLOG` bytes) closes the link;
  later sends are dropped, never raised.
- `receive` returns the whole messages that have arrived, without waiting; one thread at a time
  may call it.

The peer is this controller's own child (or parent), so the pickles are trusted.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import select
import socket
import struct
import threading
import time
from collections import deque

log = logging.getLogger(__name__)

HEADER = struct.Struct("!I")
MAX_BACKLOG = 64 << 20  # bytes unread by the peer before the link gives up on it


class Link:
    """One end of a connected stream socket; see the module docstring."""

    def __init__(self, sock: socket.socket, name: str):
        sock.setblocking(True)  # reads and writes that must not wait say MSG_DONTWAIT
        self.sock = sock
        self.name = name
        self._outbox: deque[bytes] = deque()  # frames queued by senders
        self._backlog = bytearray()  # frames the socket has not taken yet
        self._lock = threading.Lock()  # held by the one thread writing to the socket
        self._stalled = threading.Event()  # the backlog is not empty
        self._flusher: threading.Thread | None = None
        self._inbox = bytearray()  # received bytes not yet a whole frame
        self._received: deque[tuple] = deque()  # whole messages not yet returned
        self.closed = False  # by close(), or because the peer went away
        self.peer_closed = False  # receive() has seen the end of the peer's stream

    # -- sending ------------------------------------------------------------------------------

    def send(self, msg: tuple) -> None:
        """Queues `msg` and writes what the socket takes now; never blocks, never raises."""
        if self.closed:
            return
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        self._outbox.append(HEADER.pack(len(data)) + data)
        self._write_queued()

    def _write_queued(self) -> None:
        while self._outbox and self._lock.acquire(blocking=False):
            try:
                while self._outbox:
                    self._backlog += self._outbox.popleft()
                self._write()
                if self._backlog:
                    self._stalled.set()
                    if self._flusher is None:
                        self._flusher = threading.Thread(
                            target=self._flush, name=f"{self.name}-flush", daemon=True)
                        self._flusher.start()
            finally:
                self._lock.release()

    def _write(self) -> None:
        """Writes the backlog until the socket would block (with the lock held)."""
        try:
            while self._backlog:
                n = self.sock.send(self._backlog, socket.MSG_DONTWAIT)
                del self._backlog[:n]
        except BlockingIOError:
            if len(self._backlog) > MAX_BACKLOG:
                log.error("%s: the peer has not read %d bytes; closing the link", self.name,
                          len(self._backlog))
                self._lose()
        except OSError:  # the peer has gone
            self._lose()

    def _lose(self) -> None:
        self.closed = True
        self._backlog.clear()
        self._outbox.clear()
        self._stalled.set()  # lets the flusher see `closed`
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # the peer (and our reader) see the end

    def _flush(self) -> None:
        """The flusher thread: writes the backlog as the socket drains."""
        while True:
            self._stalled.wait()
            if self.closed:
                return
            with contextlib.suppress(OSError, ValueError):  # closed meanwhile: seen above
                select.select([], [self.sock], [], 1.0)
            with self._lock:
                self._write()
                if not self._backlog and not self.closed:
                    self._stalled.clear()
            self._write_queued()  # what senders queued while this thread held the lock

    def flushed(self, timeout: float) -> bool:
        """Waits up to `timeout` s for every queued frame to be written; True if it was."""
        end = time.monotonic() + timeout
        while (self._outbox or self._backlog) and not self.closed:
            left = end - time.monotonic()
            if left <= 0:
                break
            with self._lock:
                self._write()
            self._write_queued()
            if self._backlog:
                with contextlib.suppress(OSError, ValueError):
                    select.select([], [self.sock], [], min(0.05, left))
        return not (self._outbox or self._backlog)

    # -- receiving ----------------------------------------------------------------------------

    def wait_readable(self, timeout: float | None) -> bool:
        """Waits up to `timeout` s (None: forever) for something to receive (or the end)."""
        try:
            return bool(select.select([self.sock], [], [], timeout)[0])
        except (OSError, ValueError):  # closed
            return True

    def receive(self) -> list[tuple]:
        """The whole messages that have arrived, oldest first, without waiting."""
        self._read()
        out = list(self._received)
        self._received.clear()
        return out

    def receive_one(self, timeout: float, alive=lambda: True) -> tuple | None:
        """The next message, waiting up to `timeout` s while `alive()`; None if none came."""
        end = time.monotonic() + timeout
        while True:
            self._read()
            if self._received:
                return self._received.popleft()
            left = end - time.monotonic()
            if self.peer_closed or left <= 0 or not alive():
                return None
            self.wait_readable(min(0.1, left))

    def _read(self) -> None:
        while not self.peer_closed:
            try:
                chunk = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.peer_closed = True
                break
            self._inbox += chunk
        buf, at = self._inbox, 0
        while len(buf) - at >= HEADER.size:
            (n,) = HEADER.unpack_from(buf, at)
            start = at + HEADER.size
            if len(buf) - start < n:
                break
            self._received.append(pickle.loads(buf[start:start + n]))
            at = start + n
        del buf[:at]

    def close(self) -> None:
        """Closes the socket (frames not yet written are dropped) and ends the flusher."""
        self.closed = True
        self._stalled.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(5)
        self.sock.close()

