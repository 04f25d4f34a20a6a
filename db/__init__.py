"""PostgreSQL access: schema, migrations, named queries, the pool and the embedded server.

Exception tree::

    DatabaseError
    ├── MigrationError
    └── EmbeddedServerError
"""


class DatabaseError(Exception):
    """The database could not do what was asked."""


class MigrationError(DatabaseError):
    """The schema could not be brought up to date."""


class EmbeddedServerError(DatabaseError):
    """The embedded PostgreSQL server could not be started."""
