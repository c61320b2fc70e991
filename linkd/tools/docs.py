"""Generate man pages and shell completion from the argument parsers.

    pip install -e '.[docs]' && python -m linkd.tools.docs [OUTDIR]

writes docs/man/linkd.8, docs/man/linkctl.1 (argparse-manpage, from the very
parsers the programs use, so options and help never drift), docs/man/linkd.toml.5
(from config/linkd.example.toml, the annotated reference of every key) and
docs/completion/linkctl.{bash,zsh}, linkd.{bash,zsh} (shtab). The outputs are
committed; a test fails when they are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import __version__
from ..cli import linkctl_main, linkd_main

ROOT = Path(__file__).resolve().parents[2]


def _manpage(parser: argparse.ArgumentParser, section: int, description: str) -> str:
    from build_manpages.manpage import Manpage

    data = {"prog": parser.prog, "project_name": "linkd", "version": __version__,
            "manual_section": str(section), "manual_title": "linkd manual",
            "description": description, "url": "docs/OPERATIONS.md",
            "authors": ["the linkd project"]}
    text = str(Manpage(parser, _data=data))
    # argparse-manpage stamps today's date: keep the output reproducible
    return "\n".join(line if not line.startswith(".TH ") else
                     f'.TH {parser.prog.upper()} "{section}" "" "linkd {__version__}" '
                     '"linkd manual"' for line in text.splitlines()) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("'", "\\(aq")


def config_manpage() -> str:
    """linkd.toml(5): the annotated example, as a man page."""
    example = (ROOT / "config" / "linkd.example.toml").read_text()
    lines = [f'.TH LINKD.TOML "5" "" "linkd {__version__}" "linkd manual"', ".SH NAME",
             "linkd.toml \\- configuration of the linkd secure file link daemon",
             ".SH SYNOPSIS", "/etc/linkd/linkd.toml, or the file given to linkd \\-c",
             ".SH DESCRIPTION",
             "A TOML file. Unknown keys are errors. Paths may be relative to the file's "
             "folder. Check a file with \\fBlinkd \\-c FILE \\-\\-check\\fR and print the "
             "effective configuration with \\fBlinkd \\-c FILE \\-\\-print\\-config\\fR. "
             "Reloaded on SIGHUP except [node] and [status], which need a restart.",
             ".SH REFERENCE", "Every key, with its default, as in config/linkd.example.toml:",
             ".PP", ".nf"]
    lines += [_escape(line) if not line.startswith(".") else "\\&" + _escape(line)
              for line in example.splitlines()]
    lines += [".fi", ".SH SEE ALSO", "linkd(8), linkctl(1)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import shtab

    out = Path(argv[0]) if argv else ROOT / "docs"
    (out / "man").mkdir(parents=True, exist_ok=True)
    (out / "completion").mkdir(parents=True, exist_ok=True)
    linkd_p, linkctl_p = linkd_main.parser(), linkctl_main.parser()
    files = {
        out / "man" / "linkd.8": _manpage(
            linkd_p, 8, "secure exactly-once file link daemon"),
        out / "man" / "linkctl.1": _manpage(
            linkctl_p, 1, "operate a linkd daemon, queue files, make a link PKI"),
        out / "man" / "linkd.toml.5": config_manpage(),
    }
    for prog, parser in (("linkd", linkd_p), ("linkctl", linkctl_p)):
        for shell in ("bash", "zsh"):
            files[out / "completion" / f"{prog}.{shell}"] = shtab.complete(parser, shell=shell)
    for path, text in files.items():
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
