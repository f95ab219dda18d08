"""What a drill of one server notes while it drives it (`DriveRecord`) and what it comes
to (`ServerDrillResult`): the parts the shutdown and crash drills share, each adding its
own (the distributed drill's web server is a shutdown drill's)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..._engine.report import ShutdownReport
from .harness import DrillPlan
from .load import Load


@dataclass(kw_only=True)
class DriveRecord:
    """What driving the server under drill has produced so far, before the books are
    checked (each drill notes more): what the clients saw, the problems met, and the
    server's exit status."""

    load: Load = field(default_factory=Load)
    problems: list[str] = field(default_factory=list)
    exit_status: int | None = None


@dataclass(frozen=True, kw_only=True)
class ServerDrillResult:
    """What a drill of one server comes to (each drill adds its own): the plan, what the
    clients saw, the server's shutdown report and exit status, the problems found, and
    the server's last log lines."""

    plan: DrillPlan
    load: Load
    report: ShutdownReport | None
    exit_status: int | None
    problems: tuple[str, ...]
    server_log_tail: tuple[str, ...]

    @property
    def passed(self) -> bool:
        """True when the drill found no problem."""
        return not self.problems

    def server_logs(self, server_failed: bool = True) -> dict[str, tuple[str, ...]]:
        """The server's last log lines under their heading, for `Table.end`: when the
        drill failed and (``server_failed``) the server is to blame; else none."""
        if self.problems and server_failed and self.server_log_tail:
            return {"the server's last log lines": self.server_log_tail}
        return {}
