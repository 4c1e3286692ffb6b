"""`make playground COND=x`: a small page for trying one condition in a browser, on 127.0.0.1.

Starts the condition's Cog server (as `make serve` does) and serves one static page next to it. The
page talks to Cog only through its HTTP API (GET /openapi.json, an async PUT /predictions/{id} whose
webhook comes back here), relayed by this process so that the browser sees one origin. The form is
built from the served schema, so an input added to a predictor appears here with its type, choices,
range and default.

Not Gradio (what ControlNet's own demos use), though it was the first choice: gradio 6.31 would
replace the fastapi, starlette and pillow of the one pinned environment that Cog's server, the tests
and the images share (pip's resolver: fastapi 0.118 -> 0.165, starlette 0.48 -> 1.10, pillow 13.0 ->
12.3), and the page would then talk to Cog through Gradio's Python backend rather than through Cog's
HTTP API. One static page and the standard library's HTTP server need nothing new.
"""

from __future__ import annotations

import argparse
import json
import threading
import uuid
import webbrowser
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from scripts.serve import port_number, require_port

PAGE = Path(__file__).with_name("playground.html")
RELAYED = ("/openapi.json", "/health-check")
KEPT = 16  # predictions whose latest state is kept for the page to poll


def make_handler(cog_url: str, condition: str | None = None, timeout: float = 60):
    """Predictions go to Cog asynchronously with a webhook back to this process, so the page can show
    Cog's own progress lines while it runs (a synchronous POST answers only at the end)."""
    states: OrderedDict[str, bytes] = OrderedDict()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self.reply(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path.startswith("/api/predictions/"):
                with lock:
                    state = states.get(self.path.removeprefix("/api/predictions/"))
                self.reply(200, state, "application/json") if state else self.not_found()
            elif self.path == "/api/about":  # what the page names in its title
                self.reply(200, json.dumps({"condition": condition}).encode(), "application/json")
            elif self.path.startswith("/api/") and self.path.removeprefix("/api") in RELAYED:
                self.reply(*self.ask_cog("GET", self.path.removeprefix("/api")))
            else:
                self.not_found()

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.startswith("/hook/"):  # Cog's webhook: the prediction's state so far
                prediction_id = self.path.removeprefix("/hook/")
                with lock:
                    if prediction_id in states:
                        states[prediction_id] = body
                self.reply(200, b"{}", "application/json")
            elif self.path == "/api/predictions":
                self.start(body)
            elif self.path.startswith("/api/predictions/") and self.path.endswith("/cancel"):
                prediction_id = self.path.removeprefix("/api/predictions/").removesuffix("/cancel")
                with lock:
                    known = prediction_id in states
                # Only ids this playground started reach Cog's cancel, so nothing else of its API is relayed.
                self.reply(*self.ask_cog("POST", f"/predictions/{prediction_id}/cancel")) if known else self.not_found()
            else:
                self.not_found()

        def start(self, body: bytes) -> None:
            try:
                request = json.loads(body)
            except ValueError:
                self.reply(422, b'{"detail": "the body is not JSON"}', "application/json")
                return
            prediction_id = uuid.uuid4().hex
            hook = f"http://127.0.0.1:{self.server.server_address[1]}/hook/{prediction_id}"
            starting = json.dumps({"id": prediction_id, "status": "starting"}).encode()
            with lock:
                states[prediction_id] = starting
                while len(states) > KEPT:
                    states.popitem(last=False)
            payload = json.dumps({**request, "webhook": hook}).encode() if isinstance(request, dict) else body
            answer = self.ask_cog("PUT", f"/predictions/{prediction_id}", payload, {"Prefer": "respond-async"})
            if answer[0] == 202:
                self.reply(202, starting, "application/json")
                return
            with lock:  # refused (422, 409...) or unreachable: the page shows why
                states.pop(prediction_id, None)
            self.reply(*answer)

        def ask_cog(self, method: str, path: str, body: bytes | None = None,
                    headers: dict | None = None) -> tuple[int, bytes, str]:
            """Cog's status, body and content type; 502 when it cannot be reached."""
            try:
                upstream = requests.request(
                    method, cog_url + path, data=body, timeout=timeout,
                    headers={**({"Content-Type": "application/json"} if body is not None else {}), **(headers or {})},
                )
            except requests.RequestException as exc:
                return 502, f'{{"detail": "Cog server unreachable: {type(exc).__name__}"}}'.encode(), "application/json"
            return upstream.status_code, upstream.content, upstream.headers.get("Content-Type", "application/json")

        def not_found(self) -> None:
            self.reply(404, b'{"detail": "not found"}', "application/json")

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

    def __init__(self, cog_url: str, port: int = 0, host: str = "127.0.0.1", condition: str | None = None):
        self.httpd = ThreadingHTTPServer((host, port), make_handler(cog_url, condition))
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
    parser.add_argument("--port", type=port_number, default=7860, help="the page's port (PLAYGROUND_PORT)")
    parser.add_argument("--cog-port", type=port_number, default=None, help="the Cog server's port (PORT; default: a free one)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    args = parser.parse_args()
    require_port(args.port, who="make playground", variable="PLAYGROUND_PORT")
    if args.cog_port:
        require_port(args.cog_port, who="make playground")

    from scripts.cog_server import CogServer

    print(f"Starting the Cog server for {args.cond} (tiny weights when the real ones are absent)...", flush=True)
    try:
        # CogServer makes SIGTERM unwind as Ctrl-C does, so both ways leave through __exit__ and stop Cog.
        with CogServer(args.cond, port=args.cog_port) as server, \
                Playground(server.url, args.port, condition=args.cond) as page:
            print(f"Cog server: {server.url} (log: {server.log_path})")
            print(f"Playground: {page.url}   Ctrl-C stops both.", flush=True)
            if args.open:
                webbrowser.open(page.url)
            try:
                threading.Event().wait()
            finally:
                print("\nStopping.", flush=True)
    except (KeyboardInterrupt, SystemExit):
        pass


if __name__ == "__main__":
    main()
