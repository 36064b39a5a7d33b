"""The HTTP front end: REST sector API, health checks, metrics endpoint."""
