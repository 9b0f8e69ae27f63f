"""A loopback HTTP server for the download tests: serves a folder on 127.0.0.1 at a free port,
in a thread, and shuts down when the block ends (no traffic leaves the machine)."""
import contextlib
import http.server
import threading


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(directory, handler=None):
    """Serve ``directory`` on 127.0.0.1 at a free port in a thread; yields the base URL.

    handler: an optional request-handler factory (e.g. one that breaks transfers)."""
    cls = handler or (lambda *a, **k: QuietHandler(*a, directory=str(directory), **k))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
