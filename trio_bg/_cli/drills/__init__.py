"""The drills: one harness, and the shutdown, crash and distributed drills on it."""
