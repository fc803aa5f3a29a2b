"""One TCP connection from the test guest to a port on the host's loopback (vm.py beside this file, `forwards`).

qemu's user-mode network (restrict=on, `guestfwd=...-cmd:`) starts this program for each connection the guest opens to
the forwarded address, with that connection as its stdin, stdout and stderr: it connects to 127.0.0.1:PORT and copies
bytes both ways until both sides have closed. Standard library only, started with -I -S for a quick start (the
kubelet and the driver open several connections); it writes nothing of its own, since stderr is the guest's stream.

    python3 -I -S relay.py PORT
"""

from __future__ import annotations

import os
import select
import socket
import sys


def relay(port: int) -> None:
    guest = socket.socket(fileno=os.dup(0))
    for fd in (0, 1, 2):
        os.close(fd)
    try:
        host = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        guest.close()
        return
    host.settimeout(None)
    peer = {guest: host, host: guest}
    reading = [guest, host]
    try:
        while reading:
            ready, _, _ = select.select(reading, [], [])
            for sock in ready:
                data = sock.recv(1 << 16)
                if data:
                    peer[sock].sendall(data)
                    continue
                # A half-close: the other side may still answer (HTTP/1 clients close their side after a request).
                reading.remove(sock)
                peer[sock].shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        guest.close()
        host.close()


if __name__ == "__main__":
    relay(int(sys.argv[1]))
