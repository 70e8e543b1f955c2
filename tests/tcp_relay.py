"""A TCP relay in a process of its own: ``python tcp_relay.py UPSTREAM_PORT``
listens on a free port, prints it, and pipes every connection to the
upstream port on 127.0.0.1.

Being its own process is the point: SIGSTOP freezes it whole, and the kernel
still accepts connections on its listening socket (the backlog) and takes
the bytes sent to it, but nothing answers: an endpoint that hangs, not one
that is down. SIGCONT and it goes on where it stopped.
"""

import socket
import sys
import threading


def _pipe(src, dst):
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _serve(client, upstream_port):
    try:
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
    except OSError:
        client.close()
        return
    threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
    threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()


def main():
    upstream_port = int(sys.argv[1])
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    print(listener.getsockname()[1], flush=True)
    while True:
        client, _ = listener.accept()
        _serve(client, upstream_port)


if __name__ == "__main__":
    main()
