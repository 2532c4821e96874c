from loraserve.cli import app

if __name__ == "__main__":  # the engine process (spawned) imports the main module again: it must not run the CLI
    app()
