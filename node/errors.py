"""Every error the node layer raises, in one tree.

NodeError                   base of everything raised by ``node``; its text is one line for the user
├── ConfigError             a config file, environment variable or flag that cannot be used
├── NotRunningError         no node answers on the data directory's control socket
├── AlreadyRunningError     another process holds the data directory
└── ControlError            the running node refused or failed a command (``code`` says which)

The CLI prints ``str(error)`` after ``eidetica-node: error:`` and exits non-zero, so each
message says what went wrong and, where there is one, what to do about it.
"""

from __future__ import annotations

from pathlib import Path


class NodeError(Exception):
    """Base class of every error raised by the ``node`` package."""

    exit_code = 1


class ConfigError(NodeError):
    """A setting that cannot be used (names the file, variable or flag it came from)."""

    exit_code = 2


class NotRunningError(NodeError):
    """No node serves the control socket of ``data_dir``."""

    exit_code = 3

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        super().__init__(
            f"no node is running for data directory {data_dir}; start one with: eidetica-node run --data-dir {data_dir}"
        )


class AlreadyRunningError(NodeError):
    """The data directory is locked by another process (a node, most likely)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        super().__init__(f"data directory {data_dir} is in use by another process (a node is already running there?)")


class ControlError(NodeError):
    """The node answered a command with an error.

    ``code`` is the control API's error code (``not_found``, ``bad_request``, ``pending``,
    ``access``, ``unreachable``, ``internal`` ...), so scripts can branch without parsing text.
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


__all__ = ["AlreadyRunningError", "ConfigError", "ControlError", "NodeError", "NotRunningError"]
