"""--config FILE: a job described by a file (TOML or JSON) of Config fields, as torchtitan's are; the
flags given beside it win over it, and it over the recipe's defaults (config.parse_config)."""
import json
import os

from .errors import UsageError


def _toml():
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise UsageError("--config: TOML needs Python 3.11 or pip install tomli: or give the settings "
                             "as JSON") from None
    return tomllib


# a run's config.json holds these beside the settings: what the run was, not how to run it
RUN_KEYS = ("spec", "torch")
# and where that run wrote and what it resumed: a replay of its config.json takes them from its own flags
NOT_REPLAYED = ("out", "resume", "eval_only")


def load_config_file(path, parser):
    """--config FILE: {Config field: value} from TOML (.toml) or JSON (.json; other names: JSON, else
    TOML). Keys are the flags' names (lr, batch_size or batch-size); a run's own config.json (it has
    `spec`) loads as it was written, without its out/resume. Each value is checked against its flag's
    type and choices; a bad file is one line naming the key and the fix."""
    from dataclasses import fields
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file: give a TOML or JSON file of settings (a run's "
                         f"config.json works)")
    with open(path, "rb") as f:
        raw = f.read()
    kinds = ["toml"] if path.endswith(".toml") else ["json"] if path.endswith(".json") else ["json", "toml"]
    data, why = None, ""
    for kind in kinds:
        try:
            data = json.loads(raw) if kind == "json" else _toml().loads(raw.decode())
            break
        except (ValueError, UnicodeDecodeError) as e:
            why = f"not valid {kind.upper()}: {str(e).splitlines()[0]}"
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: {why or 'not a table of settings'}: write one setting per key, "
                         f"e.g. lr = 0.01 (TOML) or {{\"lr\": 0.01}} (JSON)")
    from .config import Config  # the fields a file may set (config.py imports this module)
    run_file = "spec" in data
    types = {f.name: f.type for f in fields(Config)}
    actions = {a.dest: a for a in parser._actions}
    settings = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k in RUN_KEYS or (run_file and k in NOT_REPLAYED):
            continue
        if k not in types:
            raise UsageError(f"--config {path}: unknown setting {key!r}: use the flags' names (e.g. lr, "
                             f"batch_size; python launch/train.py --help lists them)")
        want = types[k]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        nullable = value is None and actions[k].default is None
        if not nullable and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
            raise UsageError(f"--config {path}: {k} = {value!r} is not {'an' if want is int else 'a'} "
                             f"{want.__name__}: give it as its flag takes it")
        if actions[k].choices and value not in actions[k].choices and value != actions[k].default:
            raise UsageError(f"--config {path}: {k} = {value!r}: choose from "
                             f"{', '.join(map(str, actions[k].choices))}")
        settings[k] = value
    return settings
