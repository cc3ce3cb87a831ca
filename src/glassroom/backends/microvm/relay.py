"""Run by QEMU for each guest connection to the proxy address (slirp ``guestfwd``
``cmd:``): relays stdin/stdout to the egress proxy's Unix socket.  Stdlib only."""

import os
import select
import socket
import sys


def main() -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    open_in = True
    while True:
        fds = [s] + ([0] if open_in else [])
        r, _, _ = select.select(fds, [], [])
        if 0 in r:
            data = os.read(0, 65536)
            if data:
                s.sendall(data)
            else:
                open_in = False
                s.shutdown(socket.SHUT_WR)
        if s in r:
            data = s.recv(65536)
            if not data:
                return
            view = memoryview(data)
            while view:
                view = view[os.write(1, view) :]


if __name__ == "__main__":
    main()
