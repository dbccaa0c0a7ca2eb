"""Request lifecycle without HTTP: the service, the runner's model thread, the response schemas."""
