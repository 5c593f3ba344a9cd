"""The ``msn-shards`` command (docs/formats.md Sec. 9): ``msn-shards write SRC DST`` copies
an ImageFolder into tar shards (:func:`~msn.data.shard_writer.write_shards`);
``python -m msn.data.shards_cli write ...`` is the same command.
"""

from __future__ import annotations

import argparse
import sys

from msn.data.shard_index import ShardError
from msn.data.shard_writer import write_shards


def main(argv: list[str] | None = None) -> int:
    """``msn-shards write SRC DST [--samples-per-shard N] [--overwrite]``."""
    parser = argparse.ArgumentParser(prog="msn-shards", description="Tar shards of an ImageFolder for data=shards "
                                     "(docs/formats.md Sec. 9).")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="copy an ImageFolder into tar shards with an index.json")
    write.add_argument("src", help="ImageFolder root (one sub-folder per class), e.g. /data/imagenet/train")
    write.add_argument("dst", help="output folder (new or empty), e.g. /shards/imagenet/train")
    write.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                       help="images per tar file (default 1000: about 110 MB of ImageNet)")
    write.add_argument("--overwrite", action="store_true",
                       help="replace the index and the shards it names in a non-empty DST (other files stay)")
    write.add_argument("--workers", type=int, default=8, metavar="N",
                       help="shards written at once, by threads (default 8; the work is I/O-bound)")
    write.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        index = write_shards(args.src, args.dst, args.samples_per_shard, args.overwrite, not args.no_progress,
                             args.workers)
    except ShardError as error:
        print(f"msn-shards: error: {error}", file=sys.stderr)
        return 2
    skipped = sum(size == 0 for entry in index["shards"] for size in entry["sizes"])
    print(f"wrote {index['num_samples']} images of {len(index['classes'])} classes in {len(index['shards'])} "
          f"shards to {args.dst}" + (f"; {skipped} files not copied (links out of SRC or not images: see the "
                                     "warnings), their samples left empty" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
