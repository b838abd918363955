"""Faults injected for real: an S3 endpoint that goes away and comes back."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from forgeml.runtime import free_port


class EndpointOutage:
    """A TCP relay from a port on 127.0.0.1 to a server's port there, that can go down
    and come back on the same port: down, the port refuses connections and the open ones
    are reset, as clients see an S3 endpoint that stops; the server behind it keeps its
    objects, as a real one keeps them on disk."""

    def __init__(self, server_port: int):
        self.server = ("127.0.0.1", server_port)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._trigger: bytes | None = None
        #: Set when a request holding the armed trigger went through and the relay went down.
        self.tripped = threading.Event()
        self.up()

    def down_during(self, trigger: bytes) -> None:
        """Go down in the middle of the next request holding ``trigger`` (a key in its
        request line): its first bytes reach the server, the rest never do."""
        self.tripped.clear()
        self._trigger = trigger

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        """Stop listening and reset every open connection."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        listener.close()
        with self._lock:
            connections, self._open = self._open, set()
        for connection in connections:
            with contextlib.suppress(OSError):  # closed by its pump meanwhile
                # a linger of 0 makes close() send a reset
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            _close(connection)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.server)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink, requests in ((client, upstream, True), (upstream, client, False)):
                pump = threading.Thread(target=self._pump, args=(source, sink, requests))
                pump.daemon = True
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        # A reset or closed side (the relay going down, or a client or the server done
        # with the connection) ends the pump, and the connection with it.
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if requests and self._trigger and self._trigger in data:
                    sink.sendall(data[: data.index(self._trigger) + len(self._trigger)])
                    self._trigger = None
                    self.down()
                    self.tripped.set()
                    return
                sink.sendall(data)
        with self._lock:
            self._open -= {source, sink}
        _close(source)
        _close(sink)


def _close(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)
    connection.close()
