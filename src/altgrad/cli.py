"""The ``altgrad`` command: ``altgrad formats``, ``altgrad train``, ``altgrad matrix``, ``altgrad report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from altgrad.quantization.formats import FORMATS
from altgrad.versions import version_line


def _format_number(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def formats_table() -> str:
    """The registered formats as an aligned text table."""
    header = ["name", "E", "M", "bias", "specials", "min_subnormal", "min_normal", "max"]
    rows = [[_format_number(fmt.describe()[key]) for key in header] for fmt in FORMATS.values()]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    )


def _cmd_formats(args: argparse.Namespace) -> int:
    print(formats_table())
    return 0


def _finished_message(run_dir: Path, summary: dict) -> str:
    from altgrad.training.run_folder import resume_command

    if summary["status"] == "nan_stop":
        return f"{run_dir} stopped on a non-finite value at step {summary['steps']}; nothing to continue"
    return (
        f"{run_dir} is already complete ({summary['steps']} steps); nothing changed. To train further: "
        f"{resume_command(run_dir)} --set train.max_steps=N"
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from altgrad.analysis import write_run_report
    from altgrad.training.config import load_config
    from altgrad.training.distributed import is_main_process
    from altgrad.training.interrupt import exit_code
    from altgrad.training.run_folder import resume_command
    from altgrad.training.trainer import finished_summary, resume_config, train

    if args.print_config:
        print_config(args)
        return 0
    if args.resume:
        config = resume_config(args.resume, overrides=args.set)
        if (finished := finished_summary(config)) is not None:
            print(_finished_message(config.run_dir, finished))
            return 0 if finished["status"] == "completed" else 1
        summary = train(config, resume=True)
    else:
        config = load_config(args.config, overrides=args.set)
        summary = train(config, overwrite=args.overwrite)
    run_dir = config.run_dir
    if not is_main_process():  # a data-parallel rank other than 0: rank 0 reports
        if summary["status"] == "interrupted":
            return exit_code(summary["signal"])
        return 0 if summary["status"] == "completed" else 1
    if summary["status"] == "interrupted":
        print(
            f"altgrad: interrupted by {summary['signal']} after step {summary['steps']}; resume with: "
            f"{resume_command(run_dir)}",
            file=sys.stderr,
        )
        return exit_code(summary["signal"])
    write_run_report(run_dir)
    keys = ("final_train_loss", "final_val_loss", "mean_stall_ratio")
    figures = {key: _format_number(summary[key]) for key in keys}
    print(
        f"{summary['status']}: {summary['steps']} steps, final train loss {figures['final_train_loss']}, "
        f"val loss {figures['final_val_loss']}, mean stall ratio {figures['mean_stall_ratio']}"
    )
    print(f"run folder: {run_dir}  (report: {run_dir / 'report.html'})")
    return 0 if summary["status"] == "completed" else 1


def print_config(args: argparse.Namespace) -> None:
    """``altgrad train --print-config``: the resolved config (defaults, recipe, overrides) as YAML."""
    import yaml

    from altgrad.training.config import load_config

    if args.resume:
        raise ValueError("--print-config is for a new run; a run's own config is its config.yaml")
    print(yaml.safe_dump(load_config(args.config, overrides=args.set).to_dict(), sort_keys=False), end="")


def _cmd_report(args: argparse.Namespace) -> int:
    from altgrad.analysis import write_report

    path = write_report(args.directory)
    print(f"report written: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="altgrad", description=__doc__)
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True)
    formats = commands.add_parser("formats", help="print the table of registered number formats")
    formats.set_defaults(handler=_cmd_formats)

    train = commands.add_parser("train", help="train one run (no CONFIG: the built-in default)")
    train.add_argument("config", nargs="?", help="a run config YAML file")
    train.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a key")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    train.add_argument("--print-config", action="store_true", help="print the resolved config YAML and exit")
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run already in the run folder (default: refuse)"
    )
    train.set_defaults(handler=_cmd_train)

    report = commands.add_parser("report", help="write report.html/report.md for a run or a matrix folder")
    report.add_argument("directory", help="a run folder or a matrix folder")
    report.set_defaults(handler=_cmd_report)

    from altgrad.experiments.cli import register as register_matrix

    register_matrix(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:  # user errors: one line; a bug keeps its traceback
        print(f"altgrad: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("altgrad: interrupted; a run resumes from its last checkpoint: altgrad train --resume RUN_DIR",
              file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    sys.exit(main())
