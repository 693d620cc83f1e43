"""The HTTP API, one package per resource: `router.py` (parse, call the service, render),
`service.py` (the SQL and the rules), `schemas.py` (the XCreate/XPublic/XsPublic family).

`files` is the one upload service that models and datasets share; `common` holds the
owned-row lookups and pagination every resource uses."""
