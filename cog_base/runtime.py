"""Which Cog server runs, and the one place that knows it.

The pinned Cog 0.16.x runs a Python HTTP server and worker that this project fixes from inside
(cog_base/cog016/); any other Cog runs its own server, which those fixes do not fit. Moving Cog on:
delete cog_base/cog016/ and the three imports of it below.
"""

import cog

PINNED_SERVER = getattr(cog, "__version__", "").startswith("0.16.")


def install() -> None:
    if PINNED_SERVER:
        from cog_base.cog016 import install

        install()


def remove_on_worker_stop(folders) -> None:
    """The folders `folders()` names are removed when Cog stops the prediction worker (a SIGTERM that
    skips atexit); a process that is no such worker keeps its own signal handling."""
    if PINNED_SERVER:
        from cog_base.cog016.worker_stop import remove_on_worker_stop

        remove_on_worker_stop(folders)


def server_log(line: str) -> None:
    """A line for the operator only: in the pinned server's worker, its log and not a client's prediction
    logs (Cog 0.16 captures the worker's stdout and stderr per prediction); elsewhere stderr."""
    if PINNED_SERVER:
        from cog_base.cog016.serving import server_log as log

        return log(line)
    import sys

    print(line, file=sys.stderr, flush=True)
