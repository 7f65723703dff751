"""``python -m muvla.report RUN_DIR``: write RUN_DIR/report.html without going through the main CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

from muvla.report.html import write_report
from muvla.report.readers import ReportError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muvla.report", description=__doc__)
    parser.add_argument("run_dir", type=Path, help="corpus run folder (regions/, text/, retrieval/, ...)")
    parser.add_argument("--out", type=Path, default=None, help="HTML path (default RUN_DIR/report.html)")
    parser.add_argument("--max-images", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        path = write_report(args.run_dir, args.out, args.max_images)
    except ReportError as err:
        parser.error(str(err))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
