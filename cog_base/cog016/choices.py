"""Cog 0.16.12 takes the choices out of the registry's Inputs when it builds a schema.

Its get_input_type pops "enum" out of an Input's own json_schema_extra, after which the entry no
longer says what it allows, and a second schema build in the same process (tests build one per
image) would serve choice inputs as free strings. Validation does not depend on it
(cog_base/inputs.py reads every entry once, at import); only a second build does.
"""

from cog_base.inputs import Inputs

# Keyed by the entry, as aliases share one; recorded at import, before any build.
_ENTRIES = {id(entry): entry for entry in vars(Inputs).values() if hasattr(entry, "json_schema_extra")}
CHOICES = {
    key: tuple(entry.json_schema_extra["enum"]) for key, entry in _ENTRIES.items()
    if isinstance(entry.json_schema_extra, dict) and "enum" in entry.json_schema_extra
}


def restore_choices() -> None:
    """Put back the "enum" a schema build took."""
    for key, choices in CHOICES.items():
        entry = _ENTRIES[key]
        for extra in (entry.json_schema_extra, getattr(entry, "_attributes_set", {}).get("json_schema_extra")):
            if isinstance(extra, dict):
                extra["enum"] = list(choices)
