"""Signed delta updates: check an origin, fetch resumably, rebuild, install via the store, roll back an unhealthy version."""
