from langorch.cli import app

app()
