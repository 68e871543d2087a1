"""Shared test set-up: Ray without token auth (tests start their own local instances)."""
import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
