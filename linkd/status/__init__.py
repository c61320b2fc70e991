"""Live status (CONTRACT §6): the board of plain data (board.py) and the HTTP server
for it (server.py); linkctl's client half lives in linkd/cli/status_client.py and is
re-exported here for callers of the old single module."""

from ..cli.status_client import (
    _ago as _ago,
)
from ..cli.status_client import (
    _parse as _parse,
)
from ..cli.status_client import (
    _span as _span,
)
from ..cli.status_client import (
    _table as _table,
)
from ..cli.status_client import (
    _UnixHTTPConnection as _UnixHTTPConnection,
)
from ..cli.status_client import (
    format_status as format_status,
)
from ..cli.status_client import (
    http_get as http_get,
)
from ..cli.status_client import (
    http_request as http_request,
)
from ..cli.status_client import (
    human_bytes as human_bytes,
)
from ..errors import StatusSocketError as StatusSocketError
from .board import (
    STATES as STATES,
)
from .board import (
    ChannelStats as ChannelStats,
)
from .board import (
    PeerStatus as PeerStatus,
)
from .board import (
    StatusBoard as StatusBoard,
)
from .board import (
    _iso as _iso,
)
from .board import (
    _utcnow as _utcnow,
)
from .server import (
    MAX_REQUEST_BYTES as MAX_REQUEST_BYTES,
)
from .server import (
    METRICS_TYPE as METRICS_TYPE,
)
from .server import (
    READ_PATHS as READ_PATHS,
)
from .server import (
    REQUEST_TIMEOUT as REQUEST_TIMEOUT,
)
from .server import (
    TEXT as TEXT,
)
from .server import (
    WRITE_PATHS as WRITE_PATHS,
)
from .server import (
    Control as Control,
)
from .server import (
    Route as Route,
)
from .server import (
    _bind as _bind,
)
from .server import (
    _claim_path as _claim_path,
)
from .server import (
    _connection as _connection,
)
from .server import (
    _json as _json,
)
from .server import (
    _read_request as _read_request,
)
from .server import (
    _route as _route,
)
from .server import (
    _route_metrics as _route_metrics,
)
from .server import (
    _send_error as _send_error,
)
from .server import (
    log as log,
)
from .server import (
    open_metrics_listener as open_metrics_listener,
)
from .server import (
    peer_uid as peer_uid,
)
from .server import (
    privileged as privileged,
)
from .server import (
    render_metrics as render_metrics,
)
from .server import (
    serve_metrics as serve_metrics,
)
from .server import (
    serve_status as serve_status,
)
