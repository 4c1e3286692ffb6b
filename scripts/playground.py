"""`make playground COND=x`: a small page for trying one condition in a browser, on 127.0.0.1.

Starts the condition's Cog server (as `make serve` does) and serves one static page next to it. The
page talks to Cog only through its HTTP API (GET /openapi.json, POST /predictions), relayed by this
process so that the browser sees one origin. The form is built from the served schema, so an input
added to a predictor appears here with its type, choices, range and default.
"""

from __future__ import annotations

import argparse
import threading
import webbrowser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

PAGE = Path(__file__).with_name("playground.html")
RELAYED = {"GET": ("/openapi.json", "/health-check"), "POST": ("/predictions",)}


def make_handler(cog_url: str, timeout: float = 3600):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self.reply(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            else:
                self.relay("GET")

        def do_POST(self):
            self.relay("POST")

        def relay(self, method: str) -> None:
            path = self.path.removeprefix("/api")
            if not self.path.startswith("/api/") or path not in RELAYED[method]:
                self.reply(404, b'{"detail": "not found"}', "application/json")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else None
            try:
                upstream = requests.request(
                    method, cog_url + path, data=body, timeout=timeout,
                    headers={"Content-Type": "application/json"} if body is not None else {},
                )
            except requests.RequestException as exc:
                self.reply(502, f'{{"detail": "Cog server unreachable: {type(exc).__name__}"}}'.encode(), "application/json")
                return
            self.reply(upstream.status_code, upstream.content, upstream.headers.get("Content-Type", "application/json"))

        def reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # one line per request is noise next to Cog's own log
            pass

    return Handler


class Playground:
    """The page server, in a thread; `url` is where a browser opens it."""

    def __init__(self, cog_url: str, port: int = 0, host: str = "127.0.0.1"):
        self.httpd = ThreadingHTTPServer((host, port), make_handler(cog_url))
        self.url = f"http://{host}:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Playground":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cond", default="canny")
    parser.add_argument("--port", type=int, default=7860, help="the page's port (Cog gets a free one)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    args = parser.parse_args()

    from scripts.cog_server import CogServer

    print(f"Starting the Cog server for {args.cond} (tiny weights when the real ones are absent)...", flush=True)
    with CogServer(args.cond) as server, Playground(server.url, args.port) as page:
        print(f"Cog server: {server.url} (log: {server.log_path})")
        print(f"Playground: {page.url}   Ctrl-C stops both.", flush=True)
        if args.open:
            webbrowser.open(page.url)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("\nStopping.")


if __name__ == "__main__":
    main()
