from loraserve.cli import app

if __name__ == "__main__":  # run by path, this file is imported again in the spawned engine process
    app()
