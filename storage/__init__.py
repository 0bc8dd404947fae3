"""Persistence: the index database (the only package that imports SQLAlchemy) and the file store."""
