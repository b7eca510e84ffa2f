"""Data migrations: named, batched, resumable changes of existing data, with their state."""
