"""Family commands: each module here exposes `COMMANDS`, a list of click commands or groups
that `cli.main` adds to `warden` (a family adds its commands without editing cli/main.py)."""
