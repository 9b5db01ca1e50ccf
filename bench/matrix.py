"""Every capability on every family: runs `lilliput.jobs.matrix` over the tiny specimens of every family and
writes bench/results/matrix.json (each cell "ok" with its figures, or refused / failed with its one-line
reason); `--readme` also rewrites the README's matrix table from that JSON.

    python bench/matrix.py [--readme] [--specimens llama3,qwen2] [--capabilities gptq,awq]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from lilliput.core.record import read_json, run_record, write_json
from lilliput.jobs import matrix

ROOT = Path(__file__).parent.parent
OUT = ROOT / "bench" / "results" / "matrix.json"
BEGIN, END = "<!-- matrix:begin (bench/matrix.py --readme) -->", "<!-- matrix:end -->"


def readme(results: Path, path: Path = ROOT / "README.md") -> None:
    """Replace the README's matrix block with the table of `results`."""
    record = read_json(results, "run bench/matrix.py first")
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block")
    table = (f"{BEGIN}\n{matrix.markdown(record['table'])}\n\n"
             f"From `{record['command']}` (git {str(record.get('git_sha'))[:10]}, {record.get('created')}).\n{END}")
    path.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specimens", help="comma-separated names of lilliput.eval.zoo.TINY (default: all)")
    ap.add_argument("--capabilities", help=f"comma-separated, of {', '.join(matrix.CAPABILITIES)} (default: all)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--readme", action="store_true", help="rewrite the README's matrix table from --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    command = "python bench/matrix.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = matrix.matrix(args.specimens.split(",") if args.specimens else None,
                          args.capabilities.split(",") if args.capabilities else None)
    counts = {k: sum(c.get("status") == k for row in table.values() for c in row.values() if isinstance(c, dict))
              for k in ("ok", "refused", "failed")}
    write_json(args.out, run_record(command.strip(), counts=counts, table=table))
    print(matrix.markdown(table))
    print(counts)
    if args.readme:
        readme(args.out)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
