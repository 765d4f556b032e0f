#!/usr/bin/env python3
"""vmlab host agent: runs ON THE LAB HOST, stdlib only.

    hostagent.py relay SOCKET   pipe stdin/stdout to a unix socket (QMP of a lab-side QEMU)
    hostagent.py serve          JSON lines on stdin/stdout: buffers, ivshmem fd server, moves
"""
import os
import select
import socket
import sys


def relay(path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    fin, fout = sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno()
    while True:
        r, _, _ = select.select([fin, s], [], [])
        if fin in r:
            data = os.read(fin, 65536)
            if not data:
                return 0
            s.sendall(data)
        if s in r:
            data = s.recv(65536)
            if not data:
                return 0
            os.write(fout, data)


def main(argv):
    if len(argv) >= 3 and argv[1] == "relay":
        return relay(argv[2])
    if len(argv) >= 2 and argv[1] == "serve":
        from_serve = globals().get("serve")
        if from_serve is None:
            print("serve: not available", file=sys.stderr)
            return 2
        return from_serve()
    print("usage: hostagent.py relay SOCKET | serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
