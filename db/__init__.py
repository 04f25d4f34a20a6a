"""PostgreSQL access: schema, migrations, named queries, the pool and the embedded server.

Exception tree::

    DatabaseError
    ├── DatabaseUnavailable
    ├── MigrationError
    └── EmbeddedServerError
"""


class DatabaseError(Exception):
    """The database could not do what was asked."""


class DatabaseUnavailable(DatabaseError):
    """The database cannot be reached now (down, restarting, full or gone); try again later."""


class MigrationError(DatabaseError):
    """The schema could not be brought up to date."""


class EmbeddedServerError(DatabaseError):
    """The embedded PostgreSQL server could not be started."""
