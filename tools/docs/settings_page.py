"""MkDocs hook (see mkdocs.yml): generates a reference page at build time. To be written."""
