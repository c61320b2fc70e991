"""Coverage-guided fuzzing of the frame decoder and the Session with atheris.

    python tests/fuzz/run.py --seconds 60            # every target, 60 s in all (CI)
    python tests/fuzz/run.py --seconds 3600 receiver  # one target, long run
    python tests/fuzz/run.py --target sender -- -jobs=2 -workers=2 ...  # libFuzzer flags

Each target (tests/fuzz/targets.py) runs in its own process under libFuzzer
(atheris), instrumented over `linkd.proto`, starting from the committed seed
corpus (tests/fuzz/corpus/<target>/, made by make_corpus.py from real
Sessions). New interesting inputs go to a scratch copy of the corpus (pass
--keep-corpus to grow the committed one on a long run). A crash writes the
input to tests/fuzz/crashes/<target>-crash-<sha1> and fails the run: add it to
tests/fuzz/regressions/<target>/ so that tests/proto/test_fuzz_regressions.py replays
it on every test run, then fix the bug.

Exit: 0 no crash, 1 a crash, 3 atheris is not installed (the caller decides).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def child(target: str, argv: list[str]) -> None:
    """Inside the fuzzing process: instrument linkd.proto and hand over to libFuzzer."""
    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["linkd"]):
        import targets
    fn = targets.TARGETS[target]
    atheris.Setup([sys.argv[0], *argv], fn)
    atheris.Fuzz()


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="total time for all targets")
    p.add_argument("--keep-corpus", action="store_true",
                   help="write new inputs into the committed corpus (long runs)")
    p.add_argument("targets", nargs="*", default=["decoder", "receiver", "sender"])
    p.add_argument("--", dest="extra", nargs=argparse.REMAINDER, default=[])
    args, extra = p.parse_known_args()
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("fuzz: atheris is not installed (pip install atheris): skipped", file=sys.stderr)
        return 3
    share = max(1, int(args.seconds / len(args.targets)))
    crashes = HERE / "crashes"
    failed = []
    for target in args.targets:
        seeds = HERE / "corpus" / target
        with tempfile.TemporaryDirectory(prefix=f"linkd-fuzz-{target}-") as scratch:
            corpus = seeds if args.keep_corpus else Path(scratch) / "corpus"
            if not args.keep_corpus:
                shutil.copytree(seeds, corpus)
            crashes.mkdir(exist_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", target,
                   f"-max_total_time={share}", "-rss_limit_mb=1024", "-timeout=10",
                   f"-artifact_prefix={crashes}/{target}-", "-print_final_stats=1",
                   *[e for e in extra if e != "--"], str(corpus)]
            env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}"
                   + os.environ.get("PYTHONPATH", "")}
            print(f"fuzz: {target} for {share} s", flush=True)
            run = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, errors="replace")
            tail = [line for line in run.stdout.splitlines()
                    if line.startswith(("stat::", "#", "==", "Traceback", "  ", "Done"))
                    or "Error" in line][-12:]
            print("\n".join(tail), flush=True)
            if run.returncode != 0:
                failed.append(target)
    if not any(crashes.iterdir()):
        crashes.rmdir()
    if failed:
        print(f"fuzz: crashes in {', '.join(failed)}: see {crashes}", file=sys.stderr)
        return 1
    print(f"fuzz: no crash in {', '.join(args.targets)} ({args.seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
