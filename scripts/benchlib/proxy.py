"""proxy: a byte-counting TCP relay on 127.0.0.1, to measure how many bytes a daemon fetched.

Put it between a FUSE daemon and the S3 server (the daemon's endpoint is the proxy's address)
and read ``down`` (server -> client bytes: response headers and bodies) and ``up`` afterwards.
It counts bytes on the wire, so it is the same yardstick for cssfs and rclone whatever their own
statistics say. One thread per direction per connection: meant for the random-read workload
(hundreds of small requests), not for bulk transfers on a 2-core machine.

What it knows: sockets. What it must not know: HTTP, S3, the daemons.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class CountingProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.down = 0
        self.up = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self._closing = False
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="bench-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.down = self.up = 0

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
                with self._lock:
                    if downstream:
                        self.down += len(data)
                    else:
                        self.up += len(data)
        except OSError:
            pass
        finally:
            # When either side is done, the connection is done: HTTP clients do not half-close,
            # and a server streaming a body must see the client's hang-up as it would without
            # the relay (a half-open upstream kept moto producing a body nobody reads).
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._sock.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.close()
