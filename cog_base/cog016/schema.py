"""An image's OpenAPI schema as Cog 0.16.12's server builds and serves it (its own app factory)."""

from __future__ import annotations

from pathlib import Path


def served_schema(config: dict | str | Path, train: bool = False) -> dict:
    """The schema of the image whose cog.yaml is `config` (a path, or the parsed dict)."""
    import yaml
    from cog.config import Config
    from cog.mode import Mode
    from cog.server.http import create_app

    from cog_base.cog016.choices import restore_choices

    if not isinstance(config, dict):
        config = yaml.safe_load(Path(config).read_text())
    restore_choices()  # an earlier build in this process took them
    app = create_app(cog_config=Config(config), shutdown_event=None, is_build=True,
                     mode=Mode.TRAIN if train else Mode.PREDICT)
    return app.openapi()
