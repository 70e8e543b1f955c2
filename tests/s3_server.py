"""A real S3 API server for tests: moto's standalone server, started here,
and a proxy in front of it that refuses chosen requests or goes down."""

import socket
import subprocess
import sys
import threading
import time

import pytest

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto")

from ckptio.background import reset  # noqa: E402


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port):
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    pytest.skip("moto server did not start")


@pytest.fixture
def s3(monkeypatch):
    import fsspec

    port = _free_port()
    server = _start_server(port)
    conf = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**conf)
    fs.mkdir("ckpts")
    reset()
    yield fs, server
    reset()
    server.kill()
    server.wait()
    s3fs.S3FileSystem.clear_instance_cache()


# --- failures on the wire: a proxy in front of the server refuses chosen requests ----

class RefusingProxy:
    """An HTTP proxy in front of the S3 server that refuses chosen requests
    (403 AccessDenied, which clients do not retry) the next `times` times
    they come, or, while `down`, drops every connection unanswered: real
    failures on the wire, while the server itself keeps its objects."""

    def __init__(self, upstream_port: int):
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        proxy = self
        self.rules = []  # [method, substring of the request path, refusals left]
        self.down = False  # True: every request's connection drops unanswered
        self.down_at = None  # (method, substring of the path): go down when such a request comes
        self.refused = []
        self.lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or ""):
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            return out
                        out += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, status, headers, data):
                self.send_response(status)
                length = str(len(data))
                for k, v in headers:
                    if k.lower() == "content-length" and self.command == "HEAD":
                        length = v  # a HEAD reply has no body but tells the object's size
                    elif k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def handle_request(self):
                body = self._body()
                if proxy.down_at is not None and self.command == proxy.down_at[0] and proxy.down_at[1] in self.path:
                    proxy.down, proxy.down_at = True, None
                if proxy.down:  # as a server that died: the connection drops without a reply
                    self.close_connection = True
                    return
                if proxy._refuses(self.command, self.path):
                    error = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                             b"<Message>refused by the test proxy</Message></Error>")
                    return self._reply(403, [("Content-Type", "application/xml")], error)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("expect", "transfer-encoding", "content-length")}
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    self._reply(resp.status, resp.getheaders(), resp.read())
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_request

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def refuse(self, method: str, path_has: str, times: int = 1) -> None:
        with self.lock:
            self.rules.append([method, path_has, times])

    def _refuses(self, method: str, path: str) -> bool:
        with self.lock:
            for rule in self.rules:
                if rule[0] == method and rule[1] in path and rule[2] > 0:
                    rule[2] -= 1
                    self.refused.append(f"{method} {path}")
                    return True
        return False

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def s3_behind_proxy(s3, monkeypatch):
    import fsspec

    fs, _ = s3
    proxy = RefusingProxy(int(fsspec.config.conf["s3"]["endpoint_url"].rsplit(":", 1)[1]))
    # Failures are the point here: few attempts (a stale pooled connection still gets a retry), not
    # botocore's and s3fs's many with backoff.
    conf = dict(fsspec.config.conf["s3"], endpoint_url=proxy.url,
                config_kwargs={"retries": {"max_attempts": 3}, "connect_timeout": 5, "read_timeout": 30})
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setitem(fsspec.config.conf, "s3", conf)
    s3fs.S3FileSystem.clear_instance_cache()
    yield fs, proxy
    proxy.close()
    s3fs.S3FileSystem.clear_instance_cache()




# --- a hung endpoint: a relay process the test freezes --------------------------------

class FrozenRelay:
    """The S3 server behind tcp_relay.py, a process of its own: pause()
    (SIGSTOP) makes the endpoint hang, accepting connections and never
    answering, as a wedged load balancer or object store does; resume()
    (SIGCONT) lets it go on."""

    def __init__(self, upstream_port: int):
        import os
        import signal

        self._signal = signal
        relay = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tcp_relay.py")
        self.proc = subprocess.Popen([sys.executable, relay, str(upstream_port)], stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def pause(self):
        self.proc.send_signal(self._signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(self._signal.SIGCONT)

    def close(self):
        if self.proc.poll() is None:
            self.resume()  # never leave a stopped process behind, whatever happens next
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def s3_behind_relay(s3, monkeypatch):
    """(fs straight to the server, FrozenRelay): ckptio's URLs go through the
    relay, with no timeouts of the test's own (ckptio's CKPTIO_REMOTE_* apply);
    `fs` sees what the server holds whatever the relay does."""
    import fsspec

    fs, _ = s3
    relay = FrozenRelay(int(fsspec.config.conf["s3"]["endpoint_url"].rsplit(":", 1)[1]))
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(fsspec.config.conf["s3"], endpoint_url=relay.url))
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield fs, relay
    finally:
        relay.close()
        s3fs.S3FileSystem.clear_instance_cache()
