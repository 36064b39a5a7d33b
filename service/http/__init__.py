"""The HTTP front end: REST sector API, health checks, the metrics endpoint and the ring view."""
