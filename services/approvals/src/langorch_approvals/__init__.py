"""LangOrch approvals service."""
