"""Keeping tasks outside the process: the SQLite journal of durable tasks and the
hand-off of remote tasks to streaq workers over Redis."""
