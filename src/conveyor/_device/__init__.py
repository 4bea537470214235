"""The device worker: one process owns a device; clients reach it over a Unix socket."""
