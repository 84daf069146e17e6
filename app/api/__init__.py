"""The HTTP edge: routes, error-to-status mapping and the OpenAPI document."""
