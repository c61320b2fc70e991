#!/usr/bin/env python3
"""Summarise a py-spy collapsed-stack file (`python -m bench --profile DIR`).

    .venv/bin/python bench/profile_top.py DIR/small-sender.txt [-n 25] [--filter linkd]

Prints, per thread kind (the event loop vs. worker threads), the share of samples
whose stack includes each function ("incl") and the share where it is the innermost
frame ("self"). The bench records with --gil (only the thread holding the GIL is
sampled): the shares are shares of the Python time, not of the time spent in the
kernel or waiting.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_FRAME = re.compile(r"^(?P<fn>[^ ]+) \((?P<file>[^:]+)(?::(?P<line>\d+))?\)$")


def short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("/linkd/", "site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('fn')} ({path})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file")
    ap.add_argument("-n", type=int, default=25)
    ap.add_argument("--filter", default="", help="only functions whose text contains this")
    args = ap.parse_args(argv)
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    threads: collections.Counter[str] = collections.Counter()
    with open(args.file) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            count = int(n)
            frames = [short(x) for x in stack.split(";")]
            total += count
            kind = "loop" if "MainThread" in frames[0] else "threads"
            threads[kind] += count
            for fr in set(frames[1:]):
                incl[fr] += count
            self_[frames[-1]] += count
    if not total:
        print("no samples")
        return 1
    print(f"{total} samples; " + ", ".join(f"{k} {100 * v / total:.0f} %"
                                           for k, v in threads.most_common()))
    print(f"\n{'incl %':>7} {'self %':>7}  function")
    shown = 0
    for fn, n in incl.most_common():
        if args.filter and args.filter not in fn:
            continue
        print(f"{100 * n / total:7.1f} {100 * self_[fn] / total:7.1f}  {fn}")
        shown += 1
        if shown >= args.n:
            break
    print(f"\ntop self time\n{'self %':>7}  function")
    for fn, n in self_.most_common(args.n):
        print(f"{100 * n / total:7.1f}  {fn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
