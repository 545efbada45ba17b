"""Shared pytest configuration; helpers live in support.py."""
