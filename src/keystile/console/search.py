"""Finding the keys a keys page shows: the project's keys matching the type, status and
name filters, a page at a time, reading a bounded number of records per page."""

from __future__ import annotations

from keystile.manager import MAX_PAGE_SIZE, KeyManager
from keystile.models import ApiKey
from keystile.records import encode_cursor

__all__ = ["PAGE_SIZE", "SCAN_BUDGET", "find"]

PAGE_SIZE = 50
SCAN_BUDGET = 5000  # records a name search reads at most for one page (the cursor goes on)


async def find(
    manager: KeyManager,
    project: str,
    kind: str | None,
    status: str | None,
    query: str,
    cursor: str | None,
) -> tuple[list[ApiKey], str | None]:
    """A page of the project's keys matching the filters, and the cursor after it;
    reading at most :data:`SCAN_BUDGET` records."""
    if not query:  # the manager's own paging: it reads no more than it needs
        page = await manager.list(
            project=project, type=kind, status=status, cursor=cursor, limit=PAGE_SIZE
        )
        return list(page.keys), page.next
    found: list[ApiKey] = []
    scanned = 0
    while True:
        page = await manager.list(
            project=project, type=kind, status=status, cursor=cursor, limit=MAX_PAGE_SIZE
        )
        for record in page.keys:
            if query and query not in record.name.casefold():
                continue
            if len(found) == PAGE_SIZE:
                return found, encode_cursor(found[-1].id)
            found.append(record)
        scanned += len(page.keys)
        cursor = page.next
        if cursor is None or scanned >= SCAN_BUDGET:
            return found, cursor
