"""User data: prompt files, their encoding and the order they are served in."""
