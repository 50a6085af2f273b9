"""Optional integrations with third-party libraries (imported lazily)."""
