"""Everything that exists only because of Cog 0.16.12's Python server, and nothing else.

The image pins that server on purpose (README, "Why Cog 0.16.12"); its newer, Rust server (coglet)
has no worker, runner or webhook module to patch, so none of this applies to it. cog_base/runtime.py
installs this folder when the pinned 0.16.x server is what runs, and is the only module outside it
that names it: moving Cog on starts by deleting this folder (tests/test_layout.py holds the rule
that nothing else imports `cog.server` or Cog's private names).

serving.py      fixes to the HTTP process and the worker (the guard, URL inputs, webhooks, logs)
cancel.py       a cancel always cancels, whatever stage the prediction is in
choices.py      a schema build pops the registry's "enum"s: put them back
worker_stop.py  the prediction worker's files removed when Cog stops it
schema.py       an image's schema as this server builds it (scripts/openapi_dump.py, tests)
"""

from cog_base.cog016 import serving


def install() -> None:
    """Inside Cog's server this adjusts the HTTP process and the worker (see serving.py); elsewhere
    (tests, scripts) it only installs the worker's log shim, which nothing calls."""
    serving.install()
