"""The API's domain logic: no HTTP here, only domain errors (mapped to codes in ``diffq.app.api``)."""
