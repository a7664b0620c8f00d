"""Regenerate the teaching figures from the spec (matplotlib, no GPU, a few seconds).

  python launch/figures.py                    # into docs/figures/
  python launch/figures.py --out /tmp/figs
"""
import argparse
from pathlib import Path

from split_alexnet.cli import run_main
from split_alexnet.figures import write_all

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write the PNGs into")
    args = p.parse_args(argv)
    for path in write_all(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main)
