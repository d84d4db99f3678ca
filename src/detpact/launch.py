"""The `detpact` command's entry point. `detpact doctor` runs before anything heavy is
imported (torch, onnxruntime, ...), so that it can report an install where one of them is
missing or broken; every other command goes to detpact.cli."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["doctor"]:
        from detpact.commands.doctor import main as doctor_main

        return doctor_main(args[1:])
    if args[:1] == ["runs"] and args[1:2] in (["list"], ["show"], ["compare"]):  # quick: no torch import
        from detpact.commands.runs_table import main as runs_main

        return runs_main(args[1:])
    from detpact.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
