"""The ``altgrad`` command: ``altgrad formats``, ``altgrad train``, ``altgrad matrix``, ``altgrad report``."""

from __future__ import annotations

import argparse
import sys

from altgrad.quantization.formats import FORMATS


def _format_number(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def formats_table() -> str:
    """The registered formats as an aligned text table."""
    header = ["name", "E", "M", "bias", "specials", "min_subnormal", "min_normal", "max"]
    rows = [[_format_number(fmt.describe()[key]) for key in header] for fmt in FORMATS.values()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)


def _cmd_formats(args: argparse.Namespace) -> int:
    print(formats_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="altgrad", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    formats = commands.add_parser("formats", help="print the table of registered number formats")
    formats.set_defaults(handler=_cmd_formats)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"altgrad: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
