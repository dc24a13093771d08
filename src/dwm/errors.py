"""Errors that the CLI prints as one clear line (no traceback)."""


class UserError(Exception):
    """Caused by the user's input or configuration: a bad path, value, file or checkpoint."""


def disk_full(target: object, need: int, where: str, hint: str = "") -> UserError:
    """The one-line error for a write that ran out of space: what was written, the bytes it needs, the bytes free
    on `where`'s file system (-1 when unknown), and what to do."""
    import shutil

    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = -1
    return UserError(f"no space left on device writing {target}: it needs about {need:,} bytes, {free:,} free"
                     + (f" ({hint})" if hint else ""))


def read_json_object(path: object, what: str = "") -> dict:
    """A JSON file that must hold an object; a missing, unreadable or malformed file is a one-line UserError
    naming `what` it was meant to be."""
    import json
    from pathlib import Path

    name = f"{what} {path}" if what else str(path)
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {name}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"cannot read {name}: expected a JSON object")
    return obj
