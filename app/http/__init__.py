"""HTTP: routes, the door (key, upload, admission), access log, request ids, errors, docs, the server."""
