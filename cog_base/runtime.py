"""Which Cog server runs, and the one place that knows it.

The pinned Cog 0.16.x runs a Python HTTP server and worker that this project fixes from inside
(cog_base/cog016/); any other Cog runs its own server, which those fixes do not fit. Moving Cog on:
delete cog_base/cog016/ and the two imports of it below.
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
