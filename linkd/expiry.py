"""Expiry of our certificate, the peers' certificates and the CRL (CONTRACT §1, §6, §10).

Three places use the same dates and the same horizons: `linkd --check`
(warn within 30 days, fail once expired), the daemon's `cert_expiring` events
(once at 30, 7 and 1 days left, per item), and `linkctl check` / metrics. A CRL
is short-lived by design (`linkctl pki crl` signs one for 30 days, to be
published again well before): its horizon is 7 days, or a CRL fresh from the
defaults would be a warning from the day it is installed.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509

from .config import Config

WARN_DAYS = 30
THRESHOLDS = (30, 7, 1)         # days left at which cert_expiring is logged
CRL_WARN_DAYS = 7               # ... for the CRL (see the top)
CRL_THRESHOLDS = (7, 1)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def cert_not_after(path: Path) -> dt.datetime | None:
    """notAfter of the first certificate in a PEM file (None if unreadable)."""
    try:
        certs = x509.load_pem_x509_certificates(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return certs[0].not_valid_after_utc if certs else None


def crl_next_update(path: Path) -> dt.datetime | None:
    try:
        data = Path(path).read_bytes()
        crl = (x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----BEGIN")
               else x509.load_der_x509_crl(data))
    except (OSError, ValueError):
        return None
    return crl.next_update_utc


def tls_dates(cfg: Config) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(our certificate's notAfter, the CRL's nextUpdate or None)."""
    crl = crl_next_update(cfg.tls.crl) if cfg.tls.crl else None
    return cert_not_after(cfg.tls.cert), crl


def days_left(when: dt.datetime, now: dt.datetime | None = None) -> float:
    return (when - (now or _utcnow())).total_seconds() / 86400


def expiry_lines(cfg: Config, now: dt.datetime | None = None) -> tuple[list[str], list[str]]:
    """(warnings, problems) for `linkd --check`: within 30 days warns, expired fails."""
    warnings: list[str] = []
    problems: list[str] = []
    cert, crl = tls_dates(cfg)
    for label, key, when, fix, horizon in (
            (str(cfg.tls.cert), "tls.cert", cert, "issue a new certificate and reload",
             WARN_DAYS),
            (str(cfg.tls.crl), "tls.crl", crl, "publish a fresh CRL from the CA and reload",
             CRL_WARN_DAYS)):
        if when is None:
            continue
        left = days_left(when, now)
        day = when.strftime("%Y-%m-%d")
        if left <= 0:
            problems.append(f"{label} ({key}): expired on {day}: {fix}")
        elif left <= horizon:
            warnings.append(f"warning: {label} ({key}): expires on {day}, in {int(left)} "
                            f"day(s): {fix} before then")
    return warnings, problems


class ExpiryWatch:
    """Logs `cert_expiring` once per item and threshold (30, 7, 1 days left)."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.logged: set[tuple[str, str, int]] = set()

    def _one(self, what: str, subject: str, when: dt.datetime | str | None,
             now: dt.datetime, **fields: Any) -> None:
        if isinstance(when, str):
            try:
                when = dt.datetime.fromisoformat(when.replace("Z", "+00:00"))
            except ValueError:
                return
        if when is None:
            return
        left = days_left(when, now)
        crossed = [t for t in (CRL_THRESHOLDS if what == "crl" else THRESHOLDS) if left <= t]
        if not crossed:
            return
        threshold = min(crossed)
        key = (what, subject, threshold)
        if key in self.logged:
            return
        self.logged.add(key)
        self.log.warning("cert_expiring", what=what, not_after=when.isoformat()
                         .replace("+00:00", "Z"), days_left=round(left, 1),
                         threshold_days=threshold, expired=left <= 0, **fields)

    def check(self, board: Any, now: dt.datetime | None = None) -> None:
        now = now or _utcnow()
        self._one("certificate", board.node, board.cert_not_after, now)
        self._one("crl", "crl", board.crl_next_update, now)
        for peer in board.peers.values():
            self._one("peer_certificate", peer.name, peer.cert_not_after, now, peer=peer.name)
