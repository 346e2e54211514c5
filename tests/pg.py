"""The tests' PostgreSQL: found and prepared by store/scratch.py (shared with
`chatlog bench`); see there for the order in which a server is looked for."""

from __future__ import annotations

from store.scratch import LOCAL, ScratchServer, create_migrated_database, drop_databases, with_database

__all__ = ["LOCAL", "TestServer", "create_migrated_database", "drop_databases", "with_database"]


class TestServer(ScratchServer):
    """The server the session uses; every database it made is dropped at close()."""

    __test__ = False  # not a test class, whatever pytest's name rules say

    def __init__(self) -> None:
        super().__init__(prefix="chatlog_test")
