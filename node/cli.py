"""``eidetica-node``: the command line.

For now it opens (or creates) the data directory and reports what the node holds; the
daemon, sync and the control API come with the later layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from dag import DagError, Instance

DEFAULT_DATA_DIR = "data"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eidetica-node",
        description="A peer-to-peer, local-first database node.",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("EIDETICA_DATA_DIR", DEFAULT_DATA_DIR),
        help="where the node keeps its database and device key (env EIDETICA_DATA_DIR; default ./data)",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("info", help="open the data directory; print the device ID and the databases it holds")
    create = commands.add_parser("db-create", help="create a database owned by this device")
    create.add_argument("name", help="the database's name")
    return parser


def _info(instance: Instance, data_dir: str) -> dict[str, object]:
    return {
        "data_dir": os.path.abspath(data_dir),
        "device_id": instance.device_id,
        "databases": [
            {"id": db.id, "name": db.name, "entries": len(db), "tips": db.tips()} for db in instance.databases()
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "info"
    try:
        with Instance.open(args.data_dir) as instance:
            if command == "db-create":
                db = instance.create_database(name=args.name)
                result: dict[str, object] = {"id": db.id, "name": args.name}
                print(json.dumps(result) if args.json else db.id)
                return 0
            info = _info(instance, args.data_dir)
    except DagError as exc:
        print(f"eidetica-node: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"data directory  {info['data_dir']}")
    print(f"device ID       {info['device_id']}")
    databases = info["databases"]
    assert isinstance(databases, list)
    if not databases:
        print("databases       none yet (create one: eidetica-node db-create NAME)")
    for db in databases:
        print(f"database        {db['id']}  {db['name'] or '(unnamed)'}  {db['entries']} entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
