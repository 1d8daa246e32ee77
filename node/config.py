"""The node's settings: defaults < TOML config file < ``EIDETICA_*`` environment < flags.

One table (``SETTINGS``) names every setting once, with its TOML key, its environment
variable and its kind, so the three sources cannot drift apart and an unknown key in a
config file is an error (a typo silently ignored would be worse).

The config file is ``--config``, else ``$EIDETICA_CONFIG``, else ``<data dir>/config.toml``
when it exists (``eidetica-node init`` writes one with every setting commented).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_DATA_DIR = "data"
CONFIG_FILE = "config.toml"
CONTROL_SOCKET = "control.sock"
LOG_LEVELS = ("debug", "info", "warning", "error")
# Listen on every interface by default: a node is for peers on other machines. Tickets
# carry each interface's address, never the wildcard (see node/netaddr.py).
DEFAULT_P2P_LISTEN = ("/ip4/0.0.0.0/tcp/4001",)
DEFAULT_HTTP_BIND = "0.0.0.0:8080"
MAX_COUNT = 64


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Everything ``eidetica-node run`` needs; the other commands use only ``data_dir``."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    config_file: Path | None = None
    name: str | None = None
    log_level: str = "info"
    p2p: bool = True
    p2p_listen: tuple[str, ...] = DEFAULT_P2P_LISTEN
    relays: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()  # advertised first, exactly as given (transports/addresses.py)
    relay_service: bool = False
    hole_punching: bool = True
    http: bool = True
    http_bind: str = DEFAULT_HTTP_BIND
    http_advertise: tuple[str, ...] = ()
    metrics_bind: str | None = None
    signature_processes: str = "auto"  # "auto" or a count; 0 checks signatures on threads

    @property
    def control_socket(self) -> Path:
        return self.data_dir / CONTROL_SOCKET

    def signature_process_count(self) -> int:
        """How many signature-checking worker processes to start (see ``dag.verifier``).

        ``auto``: one per core, none on a single core, where a process only adds hand-offs.
        """
        if self.signature_processes == "auto":
            cores = os.cpu_count() or 1
            return cores if cores > 1 else 0
        return int(self.signature_processes)


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: the field it fills, where it lives in TOML, its variable, its kind."""

    field: str
    toml: str  # "section.key" or "key"
    env: str
    kind: str  # "str", "bool", "list", "multiaddrs", "path", "level", "optional", "count"


SETTINGS: tuple[Setting, ...] = (
    Setting("data_dir", "data_dir", "EIDETICA_DATA_DIR", "path"),
    Setting("name", "node.name", "EIDETICA_NAME", "optional"),
    Setting("log_level", "node.log_level", "EIDETICA_LOG_LEVEL", "level"),
    Setting("signature_processes", "node.signature_processes", "EIDETICA_SIGNATURE_PROCESSES", "count"),
    Setting("p2p", "p2p.enabled", "EIDETICA_P2P", "bool"),
    Setting("p2p_listen", "p2p.listen", "EIDETICA_P2P_LISTEN", "list"),
    Setting("relays", "p2p.relays", "EIDETICA_RELAYS", "list"),
    Setting("announce", "p2p.announce", "EIDETICA_ANNOUNCE", "multiaddrs"),
    Setting("relay_service", "p2p.relay_service", "EIDETICA_RELAY_SERVICE", "bool"),
    Setting("hole_punching", "p2p.hole_punching", "EIDETICA_HOLE_PUNCHING", "bool"),
    Setting("http", "http.enabled", "EIDETICA_HTTP", "bool"),
    Setting("http_bind", "http.bind", "EIDETICA_HTTP_BIND", "str"),
    Setting("http_advertise", "http.advertise", "EIDETICA_HTTP_ADVERTISE", "list"),
    Setting("metrics_bind", "metrics.bind", "EIDETICA_METRICS_BIND", "optional"),
)
BY_FIELD = {s.field: s for s in SETTINGS}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _convert(setting: Setting, value: Any, source: str) -> Any:
    """``value`` (from TOML, an environment string or a flag) as the setting's type."""
    where = f"{source}: {setting.toml}" if source.endswith(".toml") else source

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where} must be {what}, not {value!r}")

    if setting.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if setting.kind == "count":  # "auto" or a whole number, 0 included
        text = str(value).strip().lower() if isinstance(value, int | str) and not isinstance(value, bool) else None
        if text is None or not (text == "auto" or (text.isdigit() and int(text) <= MAX_COUNT)):
            raise bad(f"auto or a whole number from 0 to {MAX_COUNT}")
        return text if text == "auto" else str(int(text))
    if setting.kind in ("list", "multiaddrs"):
        if isinstance(value, str):  # environment: comma-separated
            items = tuple(part.strip() for part in value.split(",") if part.strip())
        elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            items = tuple(value)
        else:
            raise bad("a list of strings")
        if setting.kind == "multiaddrs":
            for item in items:
                if (reason := _multiaddr_error(item)) is not None:
                    raise ConfigError(f"{where} must be multiaddrs like /ip4/203.0.113.7/tcp/4001: {item!r} {reason}")
        return items
    if not isinstance(value, str):
        raise bad("a string")
    if setting.kind == "path":
        if not value:
            raise bad("a directory path")
        return Path(value)
    if setting.kind == "level":
        if value.lower() not in LOG_LEVELS:
            raise bad("one of " + ", ".join(LOG_LEVELS))
        return value.lower()
    if setting.kind == "optional":
        return value or None
    return value


def _multiaddr_error(text: str) -> str | None:
    """Why ``text`` is not a multiaddr, or None if it is one."""
    import multiaddr  # only the settings that hold multiaddrs need it
    from multiaddr.exceptions import Error as MultiaddrError

    try:
        multiaddr.Multiaddr(text)
    except (ValueError, MultiaddrError) as exc:  # parse errors are both; binascii and base58 ones ValueError
        return f"is not one ({' '.join(str(exc).split()) or type(exc).__name__})"
    return None


def _flatten(document: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """``{"p2p": {"listen": [...]}}`` -> ``{"p2p.listen": [...]}``, refusing unknown keys."""
    known = {s.toml for s in SETTINGS}
    sections = {key.partition(".")[0] for key in known if "." in key}
    flat: dict[str, Any] = {}
    for key, value in document.items():
        if key in sections and isinstance(value, dict):
            for sub, subvalue in value.items():
                flat[f"{key}.{sub}"] = subvalue
        else:
            flat[key] = value
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return flat


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's settings by TOML key; a clear error if it cannot be read or parsed."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return _flatten(document, path)


def load_config(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Merge the sources. ``flags`` holds only what was given on the command line
    (field name -> value, plus ``config`` for ``--config``)."""
    flags = dict(flags or {})
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}

    config_path: Path | None = None
    if flags.get("config"):
        config_path = Path(flags["config"])
    elif environ.get("EIDETICA_CONFIG"):
        config_path = Path(environ["EIDETICA_CONFIG"])
    # The default config file lives in the data directory, which the file itself may not
    # move: find the directory from flags and environment first.
    early_dir = flags.get("data_dir") or environ.get("EIDETICA_DATA_DIR") or DEFAULT_DATA_DIR
    if config_path is None and (Path(early_dir) / CONFIG_FILE).is_file():
        config_path = Path(early_dir) / CONFIG_FILE

    if config_path is not None:
        for key, value in read_config_file(config_path).items():
            setting = next(s for s in SETTINGS if s.toml == key)
            values[setting.field] = _convert(setting, value, str(config_path))
    for setting in SETTINGS:
        if setting.env in environ:
            values[setting.field] = _convert(setting, environ[setting.env], f"environment variable {setting.env}")
    for name, value in flags.items():
        if name in BY_FIELD and value is not None:
            values[name] = _convert(BY_FIELD[name], value, f"--{name.replace('_', '-')}")
    config = NodeConfig(config_file=config_path, **values)
    return replace(config, data_dir=config.data_dir.expanduser().absolute())


def config_template() -> str:
    """The commented config file ``init`` writes: every setting, at its default."""
    defaults = NodeConfig()
    lines = [
        "# eidetica-node configuration. Precedence: flags > EIDETICA_* environment > this file > defaults.",
        "# Every setting is shown at its default, commented out.",
        "",
    ]
    section = None
    for setting in SETTINGS:
        if setting.field == "data_dir":
            continue
        head, _, key = setting.toml.rpartition(".")
        if head != section:
            lines += ["", f"[{head}]"] if section is not None else [f"[{head}]"]
            section = head
        default = getattr(defaults, setting.field)
        lines.append(f"# {key} = {_toml_value(default)}    # env {setting.env}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if value is None:
        return '""'
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = ["CONFIG_FILE", "CONTROL_SOCKET", "SETTINGS", "NodeConfig", "config_template", "load_config"]
