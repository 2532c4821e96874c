from loraserve.cli import app

app()
