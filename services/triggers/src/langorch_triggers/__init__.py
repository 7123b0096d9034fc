"""LangOrch triggers service."""
